"""The base model that deltas and adapters go on, for the jobs that take them without training them
(`compose`, `predict`, `export`, `import`).

A delta comes as a run folder (its config names the base model, the task and the label order) or as
a delta folder / file / PEFT adapter (bare: it knows its base only by fingerprint). The base is built
from a run folder as training built it (`run_base`, `base_for`), or from `--model`: a classifier when
the stored dense tensors hold the new head a classifier of that checkpoint lacks (for as many labels as
that head has outputs), else a causal LM (`model_base`, `head_labels`). Every delta is checked against
it by fingerprint when it is loaded.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from ..core.io import DELTA_FILE
from ..errors import UsageError
from .finished import bare_base, delta_quantization, load_base
from .runfolder import CONFIG, RunFolder

PRODUCTS = {"adapter": "a PEFT adapter (--method lora or shira)", "model": "a whole model (--method full)"}
RUN_PRODUCTS = {"delta.safetensors": "delta", "adapter/adapter_config.json": "adapter"}


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


def head_labels(file: Path, model: str) -> list[str] | None:
    """Label names "0" … "N-1" for a bare delta whose saved tensors hold the new head of `model` as a
    classifier with N outputs; None when they hold no head (a causal LM's delta)."""
    from ..core.io import read

    meta, tensors = read(file)
    stored = {name: tuple(tensors[name].shape) for name in meta["saved_tensors"]}
    if not stored:
        return None
    count = _classifier_labels(model, stored)
    return None if count is None else [str(i) for i in range(count)]


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
    saved_head = None if labels or task == "causal-lm" else head_labels(sources[0].file, model)
    task = task or ("classification" if saved_head or labels else "causal-lm")
    if task == "classification":
        labels = labels or saved_head
        if labels is None:
            raise UsageError(f"{sources[0].given} saves no classification head; give the label names with --labels")
    return bare_base(model, task, labels, quantization=delta_quantization(sources[0].file))


# -- export and import: one delta or adapter ---------------------------------------------------
@dataclass
class Base:
    model: nn.Module
    name: str | None  # what to record as the adapter's base_model_name_or_path (None: the model's own)
    kind: str  # "classification" or "causal-lm"
    num_labels: int | None = None


def is_run(path: str | os.PathLike) -> bool:
    """A folder `sparsedelta train` wrote: its config.json has a "train" section (every Hugging Face
    model folder has a config.json too)."""
    config = Path(path) / CONFIG
    if not config.is_file() or (Path(path) / "adapter_config.json").is_file():
        return False
    try:
        return "train" in json.loads(config.read_text())
    except (OSError, ValueError):
        return False


def run_base(path: str | os.PathLike, model: str | None) -> Base:
    """The base model of the run in `path` (`model` replaces the recorded one), with a new head
    initialised as in training; the run's product is not attached."""
    cfg, task = load_base(path, model)
    labels = RunFolder(path).config.get("labels")
    return Base(task.model, model or cfg.model, task.name, len(labels) if labels else None)


def run_product(path: str | os.PathLike) -> str | None:
    """"delta", "adapter" (a PEFT adapter in path/adapter) or None."""
    return next((kind for name, kind in RUN_PRODUCTS.items() if (Path(path) / name).is_file()), None)


def model_base(name: str, stored: dict[str, tuple[int, ...]], task_type: str | None = None) -> Base:
    """`--model` as the base of a bare delta or adapter whose stored tensors have these shapes
    (parameter path -> shape): a classifier when some of them are its new head, else a causal LM.

    Args:
        name: a model folder, hub id or (causal LM) .gguf file.
        stored: every tensor the delta or adapter stores under a parameter path of the model.
        task_type: PEFT's task_type of an adapter ("SEQ_CLS", "CAUSAL_LM"), when it names one.
    """
    from ..models.causal_lm import load_causal_lm
    from ..models.classifier import load_classifier

    if task_type != "CAUSAL_LM":
        labels = _classifier_labels(name, stored)
        if labels is not None:
            loaded = load_classifier(name, [f"LABEL_{i}" for i in range(labels)])
            return Base(loaded.model.eval(), name, "classification", labels)
    try:
        return Base(load_causal_lm(name).model.eval(), name, "causal-lm")
    except UsageError as e:
        raise UsageError(
            f"--model {name}: the delta stores no classification head for it, and as a causal LM: {e}. Load the base "
            "model in Python and call sparsedelta.interop.export_shira / import_peft with it"
        ) from e


def _classifier_labels(name: str, stored: dict[str, tuple[int, ...]]) -> int | None:
    """The number of labels of the head among the `stored` tensors, when `name` loads as a classifier
    whose new head they fill; else None (a causal LM's delta, or a model that is no classifier)."""
    from ..models.classifier import load_classifier

    if str(name).lower().endswith(".gguf"):
        return None
    try:
        loaded = load_classifier(name, ["LABEL_0", "LABEL_1"])
    except UsageError:
        return None
    return _labels_from_head(loaded, stored)


def _labels_from_head(loaded, stored: dict[str, tuple[int, ...]]) -> int | None:
    """The number of labels of the stored head (the dimension where a 2-label head differs), or None
    when nothing stored belongs to the new head."""
    params = dict(loaded.model.named_parameters())
    heads = [
        (params[p].shape, shape)
        for p, shape in stored.items()
        if p in params and any(p.startswith(h + ".") for h in loaded.head_modules)
    ]
    if not heads:
        return None
    for ours, theirs in heads:
        if len(ours) != len(theirs):
            raise UsageError(f"the stored head tensor of shape {tuple(theirs)} cannot be this model's {tuple(ours)}")
        for a, b in zip(ours, theirs, strict=True):
            if a == 2 and b != 2:
                return b
    return 2
