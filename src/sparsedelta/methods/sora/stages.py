"""The sparsifying scheduler (the paper's Algorithm 1): ξ grids, and stages for a loop of your own."""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ...core.atomic import atomic_write
from ...errors import UsageError
from .config import GRIDS, _check_non_negative, check_schedule
from .files import save
from .gates import gate_counts, proximal_hook
from .layer import config_of, set_xi


# -- the sparsifying scheduler (the paper's Algorithm 1) -------------------------------------------
def xi_schedule(kind: str, start: float, stop: float, stages: int) -> list[float]:
    """ξ for each stage, from `start` to `stop`, named as in the official code:
    "linear": evenly spaced; "log_linear": log of evenly spaced e^ξ (dense near `stop`);
    "exp_linear": exp of evenly spaced log ξ, a geometric grid (needs start > 0).

    Returns:
        A strictly increasing list of `stages` values (start first, stop last).
    """
    if kind not in GRIDS:
        raise UsageError(f"unknown ξ grid {kind!r}; choose from {list(GRIDS)}")
    if isinstance(stages, bool) or not isinstance(stages, int) or stages < 1:
        raise UsageError(f"stages must be an integer >= 1, got {stages!r}")
    _check_non_negative("start", start)
    _check_non_negative("stop", stop)
    if stages == 1:
        return check_schedule([start])
    if not stop > start:
        raise UsageError(f"stop must be greater than start for an increasing grid, got start={start:g}, stop={stop:g}")
    steps = torch.linspace(0, 1, stages, dtype=torch.float64)
    if kind == "linear":
        values = start + (stop - start) * steps
    elif kind == "log_linear":
        if stop > 700:
            raise UsageError(f"the log_linear grid needs e^stop, which overflows for stop={stop:g}; use 'linear'")
        values = torch.log(math.exp(start) + (math.exp(stop) - math.exp(start)) * steps)
    else:
        if start == 0:
            raise UsageError(
                "the exp_linear grid is geometric and cannot start at ξ = 0 (log 0); use start > 0 or 'linear'"
            )
        values = torch.exp(math.log(start) + (math.log(stop) - math.log(start)) * steps)
    values = values.tolist()
    values[0], values[-1] = float(start), float(stop)  # exactly the ends asked for
    return check_schedule(values)


@dataclass
class Stage:
    """One sparsifying stage: its ξ, the caller's metrics, the nonzero gates, the checkpoint."""

    index: int
    xi: float
    metrics: dict
    gates: dict[str, int]
    checkpoint: str | None = None

    @property
    def nonzero(self) -> int:
        return sum(self.gates.values())

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "nonzero": self.nonzero}


def sparsify(
    model: nn.Module,
    schedule: list[float] | None,
    make_optimizer: Callable,
    train_fn: Callable,
    directory: str | os.PathLike | None = None,
    checkpoint_fn: Callable | None = None,
) -> list[Stage]:
    """Algorithm 1: train once per ξ of `schedule` (each stage raises ξ and continues from the last),
    each stage with a FRESH optimizer and learning-rate schedule, recording metrics and nonzero gates.

    Args:
        schedule: increasing ξ per stage (None: the config's schedule, else one stage at its ξ).
        make_optimizer: `make_optimizer(model) -> (optimizer, lr_scheduler or None)`, called once per stage;
            build the optimizer from `param_groups(model, ...)`. The proximal step is hooked onto it here.
        train_fn: `train_fn(model, optimizer, lr_scheduler, stage_index) -> dict of metrics (or None)`: the
            caller's training loop for one stage (forward, loss + l1_penalty(model), backward, optimizer.step(),
            lr_scheduler.step()).
        directory: if given, each stage is saved (`save`) under `directory/stage-<i>` and a summary is kept in
            `directory/stages.json`.
        checkpoint_fn: instead, `checkpoint_fn(model, stage) -> path or None` to save a stage your way.

    Returns:
        One `Stage` per ξ; pick the sparsity/accuracy trade-off from them and load that checkpoint.
    """
    config = config_of(model)
    schedule = check_schedule(schedule if schedule is not None else (config.schedule or [config.xi]))
    stages, previous = [], None
    for index, xi in enumerate(schedule):
        set_xi(model, xi)
        made = make_optimizer(model)
        optimizer, scheduler = made if isinstance(made, tuple) else (made, None)
        if optimizer is previous:
            raise UsageError(
                "make_optimizer returned the previous stage's optimizer; build a new one (and a new lr schedule) "
                "every stage: reusing an exhausted schedule trains later stages at lr 0"
            )
        handle = proximal_hook(model, optimizer)
        try:
            metrics = train_fn(model, optimizer, scheduler, index) or {}
        finally:
            handle.remove()
        previous = optimizer
        stage = Stage(index, xi, dict(metrics), gate_counts(model))
        if checkpoint_fn is not None:
            path = checkpoint_fn(model, stage)
            stage.checkpoint = None if path is None else str(path)
        elif directory is not None:
            stage.checkpoint = str(save(model, Path(directory) / f"stage-{index}").parent)
        stages.append(stage)
        if directory is not None:
            text = json.dumps([s.to_dict() for s in stages], indent=2) + "\n"
            Path(directory).mkdir(parents=True, exist_ok=True)
            atomic_write(Path(directory) / "stages.json", lambda tmp, text=text: tmp.write_text(text))
    return stages
