"""A finished run, loaded back from its folder: its settings, its task (with the data asked for) and
the trained model (base + product), for `eval`, `merge` and any later job."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from ..methods import MethodRunner, make_runner
from .config import TrainConfig
from .runfolder import RunFolder
from .tasks import Task, make_task


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
    config = folder.config
    cfg = TrainConfig.from_dict({**config["train"], **(overrides or {})}).resolved()
    runner = make_runner(cfg)
    task = make_task(cfg)
    task.load(log, model_override=model, labels=config.get("labels"), splits=splits)
    trained = runner.load(task.model, Path(folder.path)).eval()
    return FinishedRun(folder, cfg, task, runner, trained)
