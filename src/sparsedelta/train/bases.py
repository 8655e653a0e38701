"""The base model that a set of deltas goes on, for the jobs that take several (`compose`, `predict`).

A delta comes as a run folder (its config names the base model, the task and the label order) or as
a delta folder / file (a bare delta, which knows its base only by fingerprint). The base is built
from the first run folder among the inputs, as training built it, or, with none, from `--model`:
a classifier when the delta saves a head (for as many labels as the head has outputs, or the
labels given), else a causal LM. Every delta is checked against it by fingerprint when it is loaded.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from ..core.io import DELTA_FILE
from ..errors import UsageError
from .finished import bare_base, load_base
from .runfolder import CONFIG, RunFolder

PRODUCTS = {"adapter": "a PEFT adapter (--method lora or shira)", "model": "a whole model (--method full)"}


@dataclass(frozen=True)
class DeltaSource:
    """One delta given on the command line: its file, and its run folder when it came as one."""

    given: str
    file: Path
    run: Path | None

    @property
    def labels(self) -> list[str] | None:
        """The run's label names in id order (None for a bare delta or a causal LM)."""
        return RunFolder(self.run).config.get("labels") if self.run else None

    @property
    def task(self) -> str | None:
        return RunFolder(self.run).config["train"]["task"] if self.run else None


def delta_source(path: str | os.PathLike) -> DeltaSource:
    """Resolve a run folder, delta folder or delta file; refuse anything that holds no sparse delta."""
    path = Path(path)
    if not path.exists():
        raise UsageError(f"{path} does not exist; pass a run folder, a delta folder or a delta.safetensors file")
    if path.is_file():
        return DeltaSource(str(path), path, None)
    run = path if (path / CONFIG).is_file() else None
    if not (path / DELTA_FILE).is_file():
        held = next((what for sub, what in PRODUCTS.items() if (path / sub).is_dir()), None)
        raise UsageError(
            f"{path} holds {held}, not a sparse delta: only deltas can be composed or served together"
            if held
            else f"{path} has no {DELTA_FILE}; pass a run folder, a delta folder or a delta file"
        )
    return DeltaSource(str(path), path / DELTA_FILE, run)


def head_labels(file: Path) -> list[str] | None:
    """Label names "0" … "N-1" for a bare delta whose saved head has N outputs (the smallest first
    dimension among its densely saved tensors); None when it saves no tensor."""
    from ..core.io import read

    meta, tensors = read(file)
    if not meta["saved_tensors"]:
        return None
    outputs = min(tensors[name].shape[0] for name in meta["saved_tensors"])
    return [str(i) for i in range(outputs)]


def base_for(sources: list[DeltaSource], model: str | None = None, task: str | None = None, labels=None):
    """(settings, task with its base model) for deltas that share a head: from the first run folder
    among `sources` (with `model` replacing its recorded base), else from `model` itself.

    Args:
        sources: the deltas, as `delta_source` resolved them.
        model: the base model (required when every source is a bare delta).
        task: "classification" or "causal-lm" for bare deltas (default: a classifier when the delta
            saves a head, else a causal LM, as `export`/`import` decide).
        labels: label names for bare classification deltas (default: from the saved head's size).
    """
    run = next((s for s in sources if s.run is not None), None)
    if run is not None:
        if task is not None and task != run.task:
            raise UsageError(f"--task {task}: the run folder {run.given} is a {run.task} run")
        return load_base(run.run, model)
    if model is None:
        raise UsageError(
            f"{sources[0].given} is a bare delta: name its base model with --model (or pass a run folder, which records it)"
        )
    saved_head = head_labels(sources[0].file)
    task = task or ("classification" if saved_head or labels else "causal-lm")
    if task == "classification":
        labels = labels or saved_head
        if labels is None:
            raise UsageError(f"{sources[0].given} saves no classification head; give the label names with --labels")
    return bare_base(model, task, labels)
