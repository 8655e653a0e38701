"""The tasks a run can train: each plugs its data, model loading and metric into the one loop."""

from __future__ import annotations

from ...errors import UsageError
from ..config import TrainConfig
from ..distributed import World
from .base import Task, to_device
from .causal_lm import CausalLMTask
from .classification import ClassificationTask
from .diffusion import DiffusionTask
from .sft import SFTTask

TASK_CLASSES: dict[str, type[Task]] = {t.name: t for t in (ClassificationTask, CausalLMTask, SFTTask, DiffusionTask)}
GENERATIVE = (CausalLMTask.name, SFTTask.name)  # tasks whose model is a causal LM that answers with text


def make_task(cfg: TrainConfig, world: World | None = None) -> Task:
    if cfg.task not in TASK_CLASSES:
        raise UsageError(f"unknown task {cfg.task!r}; choose one of {', '.join(TASK_CLASSES)}")
    return TASK_CLASSES[cfg.task](cfg, world)


__all__ = ["GENERATIVE", "CausalLMTask", "ClassificationTask", "DiffusionTask", "SFTTask", "Task", "make_task", "to_device"]
