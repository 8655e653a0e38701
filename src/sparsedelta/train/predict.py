"""`predict`: one base model, any number of deltas, a table of texts each naming its task -> a table of
predictions (a label and its probabilities, or a generated continuation), in mixed-task batches.

Everything a user can get wrong is checked before the first prediction (the adapters and their base,
the columns, every row's task), and the output is written at the end through a temporary file and a
rename, so a refused or interrupted job leaves no half-written file.

Tasks with different label sets need heads of different shapes, which one model cannot hold: the
classification deltas are grouped by their run's labels, and each group gets a base model of its
own (one more base in memory per label set); a bare delta folder joins the first group. The rows
of each group are predicted in file order, mixing that group's tasks in every batch.
"""

from __future__ import annotations

import csv
import io
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ..core.atomic import atomic_write
from ..core.io import DeltaFileError, load
from ..core.mixed import BASE
from ..data.tables import TEXT_COLUMN_GUESSES, describe_rows, is_missing, is_text_column, read_table
from ..errors import UsageError
from .bases import DeltaSource, base_for, delta_source
from .runfolder import RunFolder
from .tasks import GENERATIVE

OUTPUTS = (".csv", ".tsv", ".jsonl", ".json", ".parquet")


@dataclass
class Group:
    """Tasks that share one base model (one head shape)."""

    names: list[str]
    cfg: object = None
    task: object = None  # the train Task: model, tokenizer, label names


def parse_adapters(items: list[str]) -> dict[str, str]:
    """NAME=PATH pairs -> {name: path}, checked; a bare PATH is named after its folder."""
    adapters = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep:
            name, path = Path(item).name or item, item
        if not name or "." in name or name == BASE:
            raise UsageError(f"--adapter {item}: name it NAME=PATH with a NAME without '.' that is not {BASE}")
        if name in adapters:
            raise UsageError(f"--adapter {name} is given twice; give each adapter its own name")
        adapters[name] = path
    if not adapters:
        raise UsageError("give at least one --adapter NAME=PATH")
    return adapters


def read_rows(path, text_columns, task_column: str, names: list[str], default_texts=None):
    """(texts per row (tuples), task per row), refusing missing columns, empty cells and unknown tasks."""
    table = read_table(path, "input")
    columns = table.column_names
    if text_columns:
        missing = [c for c in text_columns if c not in columns]
        if missing:
            raise UsageError(f"{path}: no text column {missing[0]!r}; the columns are {columns}")
    else:
        guesses = ([list(default_texts)] if default_texts else []) + [list(g) for g in TEXT_COLUMN_GUESSES]
        text_columns = next((g for g in guesses if all(c in columns for c in g)), None)
        if text_columns is None:
            strings = [c for c in columns if c != task_column and is_text_column(table.features[c])]
            if len(strings) != 1:
                raise UsageError(f"{path}: cannot tell which column holds the text (columns: {columns}); name it with --text-column")
            text_columns = strings
    cells = [table[c] for c in text_columns]
    for column, values in zip(text_columns, cells, strict=True):
        empty = [i for i, v in enumerate(values) if v is None]
        if empty:
            raise UsageError(f"{path}: text column {column!r} is empty in {describe_rows(empty)} (counting from 0); fill them in")
    if task_column in columns:
        tasks = [None if is_missing(v) else str(v).strip() for v in table[task_column]]
        empty = [i for i, t in enumerate(tasks) if t is None]
        if empty:
            raise UsageError(f"{path}: task column {task_column!r} is empty in {describe_rows(empty)} (counting from 0)")
        unknown = sorted({t for t in tasks if t not in names and t != BASE})
        if unknown:
            row = tasks.index(unknown[0])
            raise UsageError(
                f"{path}: row {row} names task {unknown[0]!r}, which no --adapter gives (adapters: {names}; "
                f"{BASE!r} for the base model)"
            )
    elif len(names) == 1:
        tasks = names * len(table)
    else:
        raise UsageError(
            f"{path}: no task column {task_column!r} (columns: {columns}); name it with --task-column, or give a single "
            "--adapter for every row"
        )
    return list(zip(*cells, strict=True)), tasks


def default_text_columns(sources: dict[str, DeltaSource]) -> list[str] | None:
    """The text columns the first run folder among the sources was trained on."""
    run = next((s.run for s in sources.values() if s.run is not None), None)
    if run is None:
        return None
    config = RunFolder(run).config
    return config["train"].get("text_columns") or config.get("data", {}).get("text_columns")


def load_groups(sources: dict[str, DeltaSource], model=None, task=None, labels=None, per_row_prompts=False) -> list[Group]:
    """Group the deltas by head, build each group's base, and load every delta onto it (checked by fingerprint).

    `per_row_prompts`: the caller formats each row for its own adapter (the server applies each run's
    chat template), so causal-lm and sft runs of one base may be served together."""
    images = [n for n, s in sources.items() if s.task == "diffusion"]
    if images:  # a UNet's delta makes images from noise: there is no text row to predict
        raise UsageError(f"--adapter {images[0]}: a diffusion run; predict reads text tables. Measure it with "
                         "`sparsedelta eval`; its sample grids are in its run folder")  # fmt: skip
    kinds = {"generative" if per_row_prompts and s.task in GENERATIVE else s.task for s in sources.values() if s.task}
    if len(kinds) > 1:
        raise UsageError(f"the run folders mix tasks {sorted(kinds)}; predict serves one kind of model at a time")
    by_head: dict[tuple | None, list[str]] = {}
    for name, source in sources.items():
        by_head.setdefault(tuple(source.labels) if source.labels else None, []).append(name)
    if None in by_head and len(by_head) > 1:  # bare deltas join the first run's group
        bare = by_head.pop(None)
        next(iter(by_head.values())).extend(bare)
    groups = [Group(names) for names in by_head.values()]
    for group in groups:
        group.cfg, group.task = base_for([sources[n] for n in group.names], model, task, labels)
        for name in group.names:
            try:
                load(group.task.model, sources[name].file, adapter_name=name)
            except DeltaFileError as e:
                raise DeltaFileError(f"--adapter {name}={sources[name].given}: {e}") from None
    return groups


def _classify(task, texts, names, max_length, device) -> list[dict]:
    encoded = task.tokenizer(*[list(c) for c in zip(*texts, strict=True)], truncation=True, max_length=max_length,
                             padding=True, return_tensors="pt")  # fmt: skip
    logits = task.model(**{k: v.to(device) for k, v in encoded.items()}, adapter_names=names).logits
    probabilities = logits.float().softmax(-1).cpu()
    labels = task.label_names
    return [
        {"label": labels[int(p.argmax())], "score": float(p.max()), "probabilities": dict(zip(labels, p.tolist(), strict=True))}
        for p in probabilities
    ]


def _generate(task, texts, names, max_length, max_new_tokens, device) -> list[dict]:
    """Greedy continuations; a run instruction-tuned on chat data (its folder keeps the chat template)
    answers each text as the user's message, through that template, and stops at the end of its turn."""
    tokenizer, chat = task.tokenizer, task.name == "sft" and task.cfg.chat_template is not None
    prompts = [t[0] for t in texts]
    if chat:
        prompts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                                 add_generation_prompt=True) for p in prompts]  # fmt: skip
    side, tokenizer.padding_side = tokenizer.padding_side, "left"  # generation continues the last token
    side_cut, tokenizer.truncation_side = tokenizer.truncation_side, "left"  # keep the prompt's end
    try:
        encoded = tokenizer(prompts, truncation=True, max_length=max_length, padding=True, return_tensors="pt",
                            add_special_tokens=not chat)  # fmt: skip
    finally:
        tokenizer.padding_side, tokenizer.truncation_side = side, side_cut
    encoded = {k: v.to(device) for k, v in encoded.items()}
    out = task.model.generate(**encoded, adapter_names=names, max_new_tokens=max_new_tokens, do_sample=False,
                              pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)  # fmt: skip
    new = out[:, encoded["input_ids"].shape[1] :]
    return [{"generation": tokenizer.decode(row, skip_special_tokens=True)} for row in new]


def write_predictions(path: Path, rows: list[dict]) -> None:
    """csv/tsv (probabilities as JSON text), jsonl, json or parquet, by the file's suffix; atomically."""
    suffix = path.suffix.lower()
    if suffix in (".csv", ".tsv"):
        text = io.StringIO()
        writer = csv.DictWriter(text, fieldnames=list(rows[0]), delimiter="," if suffix == ".csv" else "\t")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: json.dumps(v) if isinstance(v, dict) else v for k, v in row.items()})
        atomic_write(path, lambda tmp: tmp.write_text(text.getvalue()))
    elif suffix == ".jsonl":
        atomic_write(path, lambda tmp: tmp.write_text("".join(json.dumps(r) + "\n" for r in rows)))
    elif suffix == ".json":
        atomic_write(path, lambda tmp: tmp.write_text(json.dumps(rows, indent=1) + "\n"))
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        table = pa.Table.from_pylist(
            [{k: json.dumps(v) if isinstance(v, dict) else v for k, v in r.items()} for r in rows]
        )
        atomic_write(path, lambda tmp: pq.write_table(table, tmp))


def predict(
    adapters: dict[str, str],
    input_file: str | os.PathLike,
    output_file: str | os.PathLike,
    text_columns: list[str] | None = None,
    task_column: str = "task",
    model: str | None = None,
    task: str | None = None,
    labels: list[str] | None = None,
    batch_size: int = 32,
    max_length: int | None = None,
    max_new_tokens: int = 32,
    device: str | None = None,
    progress: bool = True,
) -> dict:
    """Predict every row of `input_file` with the delta its task column names, in mixed-task batches.

    Args:
        adapters: task name -> run folder, delta folder or delta file.
        input_file: csv, tsv, json(l) or parquet with a text column (two for sentence pairs) and a task
            column (not needed with a single adapter); "__base__" in it means the base model.
        output_file: where the predictions go (csv, tsv, jsonl, json or parquet): per row `row`
            (its index in the input), `task`, then `label`, `score` and `probabilities` (label -> p),
            or `generation` for a causal LM (greedy).
        text_columns, task_column: the input's columns (text default: the run's, else guessed).
        model, task, labels: the base for bare delta folders (see `train.bases.base_for`); `model`
            also replaces a run's recorded base.
        batch_size, max_length (default: the run's), max_new_tokens, device (default: CPU).
        progress: show a progress bar.

    Returns:
        {"rows", "tasks", "seconds", "rows_per_s", "output"}: the seconds and throughput of the
        predictions themselves (loading the models and reading the input excluded).

    Raises:
        UsageError, DeltaFileError: bad input (nothing is written)."""
    output = Path(output_file)
    if output.suffix.lower() not in OUTPUTS:
        raise UsageError(f"--output {output}: unknown file type {output.suffix or '(none)'}; use one of {', '.join(OUTPUTS)}")
    if not output.parent.is_dir():
        raise UsageError(f"--output {output}: the folder {output.parent} does not exist; create it first")
    if output.exists() and output.resolve() == Path(input_file).resolve():
        raise UsageError(f"--output {output} is the input file; write the predictions elsewhere")
    if batch_size < 1:
        raise UsageError(f"--batch-size must be at least 1, got {batch_size}")
    sources = {name: delta_source(path) for name, path in adapters.items()}
    texts, tasks = read_rows(input_file, text_columns, task_column, list(adapters), default_text_columns(sources))
    groups = load_groups(sources, model, task, labels)  # the input's own problems came first, before any model
    first = groups[0]
    generative = first.task.name in GENERATIVE
    if BASE in tasks and not first.task.base_is_meaningful:
        raise UsageError(
            f"{input_file}: row {tasks.index(BASE)} names {BASE!r}, but this base model's head was newly initialised for "
            "training: its predictions mean nothing; name a task instead"
        )
    device = torch.device(device or "cpu")
    results: list[dict | None] = [None] * len(texts)
    start = time.perf_counter()
    bar = _progress(len(texts), progress)
    with torch.no_grad():
        for group in groups:
            group.task.model.to(device)
            members = set(group.names) | ({BASE} if group is first else set())
            rows = [i for i, t in enumerate(tasks) if t in members]
            length = max_length or group.cfg.max_length
            for at in range(0, len(rows), batch_size):
                chunk = rows[at : at + batch_size]
                batch_texts, batch_names = [texts[i] for i in chunk], [tasks[i] for i in chunk]
                if generative:
                    out = _generate(group.task, batch_texts, batch_names, length, max_new_tokens, device)
                else:
                    out = _classify(group.task, batch_texts, batch_names, length, device)
                for i, prediction in zip(chunk, out, strict=True):
                    results[i] = {"row": i, "task": tasks[i], **prediction}
                bar.update(len(chunk))
    bar.close()
    seconds = time.perf_counter() - start
    write_predictions(output, results)
    return {"rows": len(results), "tasks": len(set(tasks)), "seconds": seconds,
            "rows_per_s": len(results) / max(seconds, 1e-9), "output": str(output)}  # fmt: skip


def _progress(total: int, show: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="predict", unit="row", disable=not show)
