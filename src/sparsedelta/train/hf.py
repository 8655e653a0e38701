"""Using sparsedelta with `transformers.Trainer`: a callback that drives a method runner.

    import torch, sparsedelta
    from transformers import Trainer, TrainingArguments
    from sparsedelta.hf import SparseDeltaCallback
    from sparsedelta.runners import make_runner
    from sparsedelta.training import TrainConfig

    runner = make_runner(TrainConfig(method="sara", threshold=1e-3, options={"reselect_step": 100}))
    model = runner.prepare(model, head_modules=["classifier"], total_steps=200)
    optimizer = torch.optim.AdamW(runner.param_groups(model))     # delta values and head, each its lr
    trainer = Trainer(model=model, args=TrainingArguments(..., max_steps=200), train_dataset=...,
                      optimizers=(optimizer, None), callbacks=[SparseDeltaCallback(runner)])
    trainer.train()
    sparsedelta.save(model, "out/")                               # only the delta (+ head)

The Trainer's own optimizer also works (it picks up every tensor with requires_grad: the delta values
and the head), with one learning rate for both. The callback adds the runner's extra loss term
(SaRA's nuclear-norm penalty) as a gradient just before each optimizer step, after the Trainer's
gradient clipping (so the penalty is not clipped) and once per optimizer step whatever the gradient
accumulation; it runs the runner's schedule (SaRA's re-selection) after each step, and writes the
delta into each checkpoint folder the Trainer saves.
"""

from __future__ import annotations

from pathlib import Path

from transformers import TrainerCallback

from ..core.io import save
from .runners import DeltaRunner, MethodRunner

PREFIX_CHECKPOINT = "checkpoint"


class SparseDeltaCallback(TrainerCallback):
    def __init__(self, runner: MethodRunner, save_delta: bool = True):
        self.runner = runner
        self.save_delta = save_delta
        self.events: list[tuple[int, str]] = []

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        extra = self.runner.extra_loss(model, state.global_step)
        if extra is not None:
            extra.backward()

    def on_step_end(self, args, state, control, model=None, optimizer=None, **kwargs):
        event = self.runner.on_step(model, state.global_step, optimizer)
        if event:
            self.events.append((state.global_step, event))
            state.log_history.append({"step": state.global_step, "sparsedelta": event})

    def on_train_end(self, args, state, control, model=None, **kwargs):
        self.runner.finish(model)

    def on_save(self, args, state, control, model=None, **kwargs):
        if self.save_delta and isinstance(self.runner, DeltaRunner) and state.is_world_process_zero:
            save(model, Path(args.output_dir) / f"{PREFIX_CHECKPOINT}-{state.global_step}" / "sparsedelta")
