"""The base model that a delta or a PEFT adapter goes with, for `export` and `import`: a run
folder's own (its task's model, without the trained product), or `--model` loaded as a sequence
classifier when the stored dense tensors hold a classification head (its number of labels read from
their shapes), else as a causal LM."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from ..errors import UsageError

RUN_PRODUCTS = {"delta.safetensors": "delta", "adapter/adapter_config.json": "adapter"}


@dataclass
class Base:
    model: nn.Module
    name: str | None  # what to record as the adapter's base_model_name_or_path (None: the model's own)
    kind: str  # "classification" or "causal-lm"
    num_labels: int | None = None


def is_run(path: str | os.PathLike) -> bool:
    from ..train.runfolder import CONFIG

    return (Path(path) / CONFIG).is_file() and not (Path(path) / "adapter_config.json").is_file()


def run_base(path: str | os.PathLike, model: str | None) -> Base:
    """The base model of the run in `path` (`model` replaces the recorded one), with a new head
    initialised as in training; the run's product is not attached."""
    from ..train.config import TrainConfig
    from ..train.runfolder import RunFolder
    from ..train.tasks import make_task

    folder = RunFolder.existing(path)
    cfg = TrainConfig.from_dict(folder.config["train"]).resolved()
    task = make_task(cfg)
    task.load(lambda *a, **k: None, model_override=model, labels=folder.config.get("labels"), splits=())
    labels = folder.config.get("labels")
    return Base(task.model.eval(), model or cfg.model, task.name, len(labels) if labels else None)


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

    if task_type != "CAUSAL_LM" and not str(name).lower().endswith(".gguf"):
        try:
            loaded = load_classifier(name, ["LABEL_0", "LABEL_1"])
        except UsageError:
            loaded = None
        labels = _labels_from_head(loaded, stored) if loaded is not None else None
        if labels is not None:
            if labels != 2:
                loaded = load_classifier(name, [f"LABEL_{i}" for i in range(labels)])
            return Base(loaded.model.eval(), name, "classification", labels)
    try:
        return Base(load_causal_lm(name).model.eval(), name, "causal-lm")
    except UsageError as e:
        raise UsageError(
            f"--model {name}: the delta stores no classification head for it, and as a causal LM: {e}. Load the base "
            "model in Python and call sparsedelta.interop.export_shira / import_peft with it"
        ) from e


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
