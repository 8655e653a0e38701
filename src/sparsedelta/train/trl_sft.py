"""TRL's `SFTTrainer` training a sparse delta instead of a PEFT adapter.

    from trl import SFTConfig
    from sparsedelta.methods import MethodSettings
    from sparsedelta.train.trl_sft import sparse_sft_trainer

    trainer = sparse_sft_trainer(model, MethodSettings(method="sara", task="sft"),
                                 args=SFTConfig(output_dir="out", max_steps=300, completion_only_loss=True),
                                 train_dataset=dataset, processing_class=tokenizer)
    trainer.train()
    sparsedelta.save(trainer.model, "delta/")

The runner attaches its delta to the projections of the causal LM (the method's budget, targets and
options as in `sparsedelta train`), the optimizer gets the runner's parameter groups (each at the
method's learning rate for a causal LM unless `settings.lr` says otherwise), and `SparseDeltaCallback`
runs the method's work around each step and saves the delta with each checkpoint. Everything else is
TRL's: its data formats, chat templates, `completion_only_loss`, `assistant_only_loss`, `packing`.
"""

from __future__ import annotations

import dataclasses
import math

import torch
from torch import nn

from ..errors import UsageError
from ..methods import MethodRunner, MethodSettings, make_runner
from ..models.causal_lm import default_targets
from .hf import SparseDeltaCallback


def sparse_sft_trainer(model: nn.Module, method: MethodSettings | MethodRunner, *, args, train_dataset, **kwargs):
    """An `trl.SFTTrainer` whose trainable parameters are `method`'s delta on `model`.

    Args:
        model: a causal LM (a transformers model, not a hub id: the delta goes onto this object).
        method: the method's settings (a runner is made from them) or a runner already made.
        args: a `trl.SFTConfig`; `max_steps` (or the epochs over `train_dataset`) sets the runner's
            schedule (SaRA's re-selection half-way, SoRA's stages).
        train_dataset: as for SFTTrainer.
        **kwargs: SFTTrainer's other arguments (processing_class, eval_dataset, callbacks, ...);
            not `peft_config` (a delta and a PEFT adapter at once) nor `optimizers`.

    Returns:
        The SFTTrainer; `trainer.model` is `model` with the delta attached.
    """
    try:
        import trl
    except ImportError as e:
        raise UsageError("TRL is not installed: pip install 'sparsedelta[trl]'") from e
    if kwargs.get("peft_config") is not None:
        raise UsageError(
            "peft_config adds a PEFT adapter, but sparse_sft_trainer trains a sparse delta; pass one or the other "
            "(for a PEFT adapter, call trl.SFTTrainer directly)"
        )
    if kwargs.get("optimizers") is not None:
        raise UsageError("sparse_sft_trainer builds the optimizer from the method's parameter groups; drop optimizers=")
    if isinstance(model, str):
        raise UsageError("pass the loaded model (AutoModelForCausalLM.from_pretrained(...)), not its name")
    if isinstance(method, MethodSettings) and method.task == "classification":  # the field's default
        method = dataclasses.replace(method, task="sft")  # a causal LM's learning rates
    runner = method if isinstance(method, MethodRunner) else make_runner(method)
    model = runner.prepare(model, [], _total_steps(args, train_dataset), default_targets(model))
    optimizer = torch.optim.AdamW(runner.param_groups(model), weight_decay=args.weight_decay)
    callbacks = [SparseDeltaCallback(runner), *(kwargs.pop("callbacks", None) or [])]
    return trl.SFTTrainer(model=model, args=args, train_dataset=train_dataset, optimizers=(optimizer, None),
                          callbacks=callbacks, **kwargs)  # fmt: skip


def _total_steps(args, train_dataset) -> int:
    """The optimizer steps the run will take: max_steps, or the epochs over the examples (before
    packing, which can only make it fewer)."""
    if args.max_steps and args.max_steps > 0:
        return args.max_steps
    per_step = args.per_device_train_batch_size * args.gradient_accumulation_steps * max(1, args.world_size)
    return max(1, math.ceil(len(train_dataset) / per_step * args.num_train_epochs))
