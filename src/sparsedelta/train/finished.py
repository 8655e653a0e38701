"""A finished run, loaded back from its folder: its settings, its task (with the data asked for) and
the trained model (base + product), for `eval`, `merge` and any later job."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from ..methods import MethodRunner, make_runner
from .config import TrainConfig
from .runfolder import RunFolder
from .tasks import Task, make_task
from .tasks.sft import CHAT_TEMPLATE


@dataclass
class FinishedRun:
    folder: RunFolder
    cfg: TrainConfig
    task: Task
    runner: MethodRunner
    model: nn.Module  # base + the run's product, in eval mode


def load_run(
    path: str | os.PathLike,
    model: str | None = None,
    overrides: dict | None = None,
    splits: tuple[str, ...] = ("test",),
    log=lambda *a, **k: None,
) -> FinishedRun:
    """The trained model of the run in `path`. `model` replaces the recorded base model; `overrides`
    replace recorded settings (e.g. another test file); `splits` are the data splits to load."""
    folder = RunFolder.existing(path)
    cfg, task = load_base(path, model, overrides, splits, log)
    runner = make_runner(cfg)
    trained = runner.load(task.model, Path(folder.path)).eval()
    return FinishedRun(folder, cfg, task, runner, trained)


def load_base(
    path: str | os.PathLike,
    model: str | None = None,
    overrides: dict | None = None,
    splits: tuple[str, ...] = (),
    log=lambda *a, **k: None,
) -> tuple[TrainConfig, Task]:
    """The base model of the run in `path` without its product, as training built it (a new head
    initialised from the run's seed, for its labels), with its tokenizer: `task.model`, in eval mode.
    Arguments as for `load_run`."""
    config = RunFolder.existing(path).config
    cfg = TrainConfig.from_dict({**config["train"], **(overrides or {})}).resolved()
    if (Path(path) / CHAT_TEMPLATE).is_file():  # the template the run was trained with, kept in its folder
        cfg = dataclasses.replace(cfg, chat_template=str(Path(path) / CHAT_TEMPLATE))
    task = make_task(cfg)
    task.load(log, model_override=model, labels=config.get("labels"), splits=splits)
    task.model.eval()
    return cfg, task


def bare_base(
    model: str | None,
    task: str = "classification",
    labels: list[str] | None = None,
    log=lambda *a, **k: None,
    quantization: str | None = None,
) -> tuple[TrainConfig, Task]:
    """A base model named directly (no run folder): a classifier for `labels` (its new head seeded
    as a run's default) or a causal LM, with its tokenizer, in eval mode; `quantization` as
    --base-quantization (see `delta_quantization`: a delta file says which base it was trained over)."""
    cfg = TrainConfig(task=task, model=model, base_quantization=quantization).resolved()
    made = make_task(cfg)
    made.load(log, labels=labels, splits=())
    made.model.eval()
    return cfg, made


def delta_quantization(file: str | os.PathLike) -> str | None:
    """The --base-quantization a delta file was trained over ("int8", "4bit"), read from the base
    dtypes its fingerprint records; None for a float base."""
    from ..core.io import read_metadata

    dtypes = {fp["dtype"] for fp in read_metadata(file)["fingerprint"].values()}
    return "int8" if "int8" in dtypes else "4bit" if dtypes & {"nf4", "fp4"} else None
