"""Using sparsedelta with `transformers.Trainer`: a callback that drives a method runner.

    import torch, sparsedelta
    from transformers import Trainer, TrainingArguments
    from sparsedelta.methods import MethodSettings, make_runner
    from sparsedelta.train.hf import SparseDeltaCallback

    runner = make_runner(MethodSettings(method="sara", threshold=1e-3, options={"reselect_step": 100}))
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
accumulation; right after each optimizer step it runs the runner's post-step work (SoRA's proximal
step on its gates, at the lr of that step); it runs the runner's schedule (SaRA's re-selection) after
each step, and writes the delta into each checkpoint folder the Trainer saves.

Several processes (`accelerate launch` or torchrun running a Trainer script): the Trainer wraps the
model in DistributedDataParallel, which averages the delta's gradients; the callback's penalty
gradient, added after that average, is the same on every process (same weights, same seeded choice
of matrix), so the processes stay identical and train as one process with the global batch would
(tests/test_accelerate.py). Two cautions: SaRA's re-selection shrinks the trainable tensors in place,
which DDP cannot follow (its gradient buckets keep their sizes), so it is refused under several
processes (`sparsedelta train` under torchrun or accelerate does it); and the Trainer multiplies the
loss by the number of processes when `average_tokens_across_devices` is on (its default) and the
model's forward takes `**kwargs`, assuming the model divides by the global token count, which a
sequence classifier's mean cross-entropy does not: pass `average_tokens_across_devices=False` for
classifiers, or their gradient (not the penalty's) is that many times too large.

Mixed precision: `TrainingArguments(bf16=True)` (on a CPU also `use_cpu=True`) or `fp16=True` runs
the forward under accelerate's autocast, as `--precision` does in `sparsedelta train`; the model, the
delta values and the optimizer state stay float32. With fp16 on a GPU accelerate scales the loss and
skips a step whose gradients overflowed: the callback then runs none of the runner's per-step work
(it sees `optimizer.step_was_skipped`); an event due at that step (SaRA's re-selection) fires at the
next step taken instead, as in `sparsedelta train` (the rule is in `methods/base.py`), and it unscales the gradients before adding the penalty's,
whether or not the Trainer clipped them. (On a CPU accelerate applies no loss scaling to fp16: prefer
bf16 there.)

A base loaded with a `BitsAndBytesConfig` (`from_pretrained(..., quantization_config=...)`): the
Trainer's constructor refuses any model transformers marked `is_quantized` unless it is a PeftModel or
carries transformers' own PEFT integration (`validate_quantization_for_training`), and neither can be
claimed honestly for a sparse delta (the PEFT flag also makes `save_pretrained` write a PEFT adapter
from a `peft_config` the model lacks). transformers offers no other way in, so construct the Trainer
inside `accept_quantized_base(model)`: it checks that the model carries a trainable delta (the packed
weights stay frozen; sparsedelta never writes them) and hides the `is_quantized` mark for the
constructor's check only, restoring it before the block ends. Nothing else in the Trainer reads that
mark: training, the Trainer's checkpoints (the quantized model as bitsandbytes serialises it, with
the delta's tensors, and the callback's `sparsedelta/` delta) and `sparsedelta.save` work as over a
float base. A model quantized by `sparsedelta.quantize` has no such mark and needs none of this.

    with accept_quantized_base(model):
        trainer = Trainer(model=model, args=..., callbacks=[SparseDeltaCallback(runner)])
    trainer.train()

A method that swaps its trainable tensors mid-run (Diff Pruning's projection) is refused: the
Trainer's optimizer and scheduler keep the tensors they were built with, so the second phase would
silently train nothing. Run it as two Trainer runs instead (phase 1 on `diff_pruning.param_groups`,
`diff_pruning.project(model)`, then phase 2 on `sparsedelta.trainable_parameters(model)`), or with
`sparsedelta train`.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

from transformers import TrainerCallback

from ..core.adapters import trainable_parameters
from ..core.io import save
from ..errors import UsageError
from ..methods import DeltaRunner, MethodRunner

PREFIX_CHECKPOINT = "checkpoint"


class SparseDeltaCallback(TrainerCallback):
    def __init__(self, runner: MethodRunner, save_delta: bool = True):
        if runner.swaps_parameters:
            raise UsageError(
                f"method {runner.name!r} swaps its trainable tensors mid-run, which transformers.Trainer's optimizer "
                "cannot follow (the later phase would train nothing); run its phases as separate Trainer runs "
                "(see sparsedelta.train.hf) or use `sparsedelta train`"
            )
        self.runner = runner
        self.save_delta = save_delta
        self.events: list[tuple[int, str]] = []

    def on_train_begin(self, args, state, control, **kwargs):
        if args.world_size > 1 and self.runner.resizes_parameters():
            raise UsageError(
                f"method {self.runner.name!r} shrinks its trainable tensors mid-run (SaRA's re-selection), which the "
                f"Trainer's DistributedDataParallel cannot follow with {args.world_size} processes; drop reselect_step, "
                "run one process, or use `sparsedelta train` under torchrun / accelerate launch (it re-selects)"
            )

    def on_step_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        scaler = getattr(optimizer, "scaler", None)  # accelerate's fp16 loss scaler, if any
        scale = float(scaler.get_scale()) if scaler is not None and scaler.is_enabled() else 1.0
        self.runner.before_step(model, state.global_step, scale)

    def on_pre_optimizer_step(self, args, state, control, model=None, optimizer=None, **kwargs):
        extra = self.runner.extra_loss(model, state.global_step)
        if extra is not None:
            _unscale(optimizer)  # the penalty's gradient is added unscaled
            extra.backward()

    def on_optimizer_step(self, args, state, control, model=None, optimizer=None, **kwargs):
        if not _skipped(optimizer):
            self.runner.after_optimizer_step(model, optimizer)

    def on_step_end(self, args, state, control, model=None, optimizer=None, **kwargs):
        if _skipped(optimizer):  # fp16 overflow: no step was taken; an event due now waits for the next one taken
            return
        event = self.runner.on_step(model, state.global_step, optimizer)
        if event:
            self.events.append((state.global_step, event))
            state.log_history.append({"step": state.global_step, "sparsedelta": event})

    def on_train_end(self, args, state, control, model=None, **kwargs):
        self.runner.finish(model)

    def on_save(self, args, state, control, model=None, **kwargs):
        if self.save_delta and isinstance(self.runner, DeltaRunner) and state.is_world_process_zero:
            save(model, Path(args.output_dir) / f"{PREFIX_CHECKPOINT}-{state.global_step}" / "sparsedelta")


@contextlib.contextmanager
def accept_quantized_base(model):
    """Let `transformers.Trainer(model=model, ...)`, constructed inside this block, take a model
    loaded with a BitsAndBytesConfig that carries a trainable sparse delta (see the module doc: the
    Trainer's check wants a PeftModel). The model's `is_quantized` mark is hidden for the block only."""
    if not getattr(model, "is_quantized", False):  # a float model, or one quantized by sparsedelta.quantize
        yield model
        return
    if getattr(model, "_sparsedelta", None) is None or not trainable_parameters(model):
        raise UsageError(
            "this model is quantized (loaded with a BitsAndBytesConfig) and carries no trainable sparse delta, and its "
            "quantized weights cannot be trained; attach one first (runner.prepare(model, ...) or sparsedelta.prepare)"
        )
    model.is_quantized = False
    try:
        yield model
    finally:
        model.is_quantized = True


def _skipped(optimizer) -> bool:
    """Whether accelerate's loss scaler skipped the last optimizer step (fp16 gradients overflowed)."""
    return bool(getattr(optimizer, "step_was_skipped", False))


def _unscale(optimizer) -> None:
    """Divide the gradients by fp16's loss scale if accelerate scales them and the Trainer has not
    unscaled them yet (it does so only to clip)."""
    scaler = getattr(optimizer, "scaler", None)
    if scaler is None or not scaler.is_enabled():
        return
    try:
        scaler.unscale_(optimizer.optimizer)
    except RuntimeError:  # "unscale_() has already been called on this optimizer since the last update()"
        pass
