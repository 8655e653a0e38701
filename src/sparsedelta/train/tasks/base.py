"""What the training loop needs from a task: a model with its data, batches, a loss, a metric.

    task.load(log)                 the model, tokenizer and data of the run (`model_override` for eval)
    task.head_modules              modules the checkpoint lacked (a new head): trained densely
    task.default_targets(model)    a method's default targets on this kind of model (None: every matrix)
    task.train_size / batches(order, batch_size) / loss(model, batch) / lengths()
    task.evaluate(model, split)    metrics of "validation" or "test"; `metric` names the headline one
    task.baseline(model)           measured before training (None when meaningless, e.g. a new head)
    task.probe_inputs(split)       a few batches of inputs, to compare two models' logits on
    task.samples(model)            anything a person would rather read than a number (generations)
    task.describe()                what config.json records of the data and model
    task.keep_files(folder)        files the run folder keeps for later use (a chat template)
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import ClassVar

import torch
from torch import nn

from ...core.quantized import quantize
from ..config import TrainConfig
from ..distributed import World


class Task:
    name: ClassVar[str]
    metric: ClassVar[str]
    higher_is_better: ClassVar[bool]
    base_is_meaningful: ClassVar[bool] = False  # the base model alone can be measured (no new head)

    def __init__(self, cfg: TrainConfig, world: World | None = None):
        self.cfg = cfg
        self.world = world or World()
        self.model: nn.Module | None = None
        self.tokenizer = None
        self.head_modules: list[str] = []
        self.model_name = ""

    def load(self, log=print, model_override: str | None = None, labels: list[str] | None = None) -> None:
        raise NotImplementedError

    def quantize_base(self) -> None:
        """--base-quantization: quantize the loaded model's linear layers (not a new head, not the LM
        head), as training did, so eval, predict and resume rebuild the same base."""
        if self.cfg.base_quantization:
            quantize(self.model, self.cfg.base_quantization, skip=self.head_modules)

    def default_targets(self, model: nn.Module) -> dict | None:
        return None

    @property
    def train_size(self) -> int:
        raise NotImplementedError

    def batches(self, order: list[int], batch_size: int) -> Iterator[dict[str, torch.Tensor]]:
        raise NotImplementedError

    def lengths(self) -> list[int] | None:
        """Token count of each training example (None: all alike), for length-grouped batches."""
        return None

    def loss(self, model: nn.Module, batch: dict) -> torch.Tensor:
        return model(**batch).loss

    def evaluate(self, model: nn.Module, split: str) -> dict:
        raise NotImplementedError

    def baseline(self, model: nn.Module) -> dict | None:
        return None

    def probe_inputs(self, split: str) -> list[dict] | None:
        """A few batches of the split as model inputs (no labels), to compare two models' logits on;
        None when the task has none to give."""
        return None

    def samples(self, model: nn.Module) -> dict | None:
        return None

    def describe(self) -> dict:
        return {}

    def keep_files(self, folder) -> None:
        """Write what a finished run needs besides its config (the chat template of an sft run)."""

    def title(self) -> str:
        return self.name


def to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device) for k, v in batch.items()}
