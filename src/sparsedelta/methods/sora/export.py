"""Rank pruning, merging into the base, and the PEFT LoRA export of a SoRA adapter."""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from ...core.atomic import atomic_write
from ...core.card import peft_task_type
from ...errors import UsageError
from .config import PEFT_CONFIG_FILE, PEFT_WEIGHTS_FILE
from .gates import ranks
from .layer import _KINDS, SoRALinear, _replace, _saved_parameters, _state, layers


# -- pruning, merging, exporting -------------------------------------------------------------------
@torch.no_grad()
def pruned_factors(layer: SoRALinear) -> tuple[torch.Tensor, torch.Tensor]:
    """(A′, B′) of the equivalent ordinary LoRA: keep = g ≠ 0, A′ = A[keep], B′ = B[:, keep]·g[keep]."""
    keep = layer.gate != 0
    return layer.lora_A[keep].clone(), layer.lora_B[:, keep] * layer.gate[keep]


@torch.no_grad()
def prune(model: nn.Module) -> dict[str, int]:
    """Drop the zero gates with their rows of A and columns of B and fold g into B (g becomes 1, so the
    branch is an ordinary LoRA of rank nnz(g) with the same scaling). In place; returns the new ranks.
    Build the optimizer again afterwards: the parameters are new tensors."""
    for layer in layers(model).values():
        a, b = pruned_factors(layer)
        layer.lora_A = nn.Parameter(a, requires_grad=layer.lora_A.requires_grad)
        layer.lora_B = nn.Parameter(b, requires_grad=layer.lora_B.requires_grad)
        layer.gate = nn.Parameter(torch.ones_like(layer.gate[: a.shape[0]]), requires_grad=layer.gate.requires_grad)
    return ranks(model)


@torch.no_grad()
def merge(model: nn.Module) -> nn.Module:
    """Fold each pruned branch into its base weight (W += scaling·B′A′) and put the plain layers back;
    the densely trained modules keep their trained values and every requires_grad flag stays as it is.
    Returns the plain model (same object)."""
    for name, layer in layers(model).items():
        a, b = pruned_factors(layer)
        weight = layer.base_layer.weight
        if a.shape[0]:
            compute = torch.promote_types(weight.dtype, torch.float32)
            update = (b.to(compute) @ a.to(compute)) * layer.scaling
            weight.add_((update.t() if _KINDS[layer.kind][1] else update).to(weight.dtype))
        _replace(model, name, layer.base_layer)
    del model._sora
    return model


def _exact_alpha(scaling: float, rank: int) -> float:
    """An α with α / rank == scaling in float64, so that PEFT's scaling (lora_alpha / r) is ours bit for bit.
    Division can step over `scaling` (e.g. no float64 α has α / 25 == 2/3); then the nearest, 1 ulp off."""
    alpha = scaling * rank
    candidates = [alpha]
    for direction in (math.inf, -math.inf):
        a = alpha
        for _ in range(4):
            a = math.nextafter(a, direction)
            candidates.append(a)
    return min(candidates, key=lambda a: (abs(a / rank - scaling), abs(a - alpha)))


def export_peft(
    model: nn.Module, directory: str | os.PathLike, base_model_name_or_path: str | None = None
) -> dict[str, int]:
    """Write the pruned adapter as a PEFT LoRA adapter that `peft.PeftModel.from_pretrained(base, directory)`
    loads unchanged (the model itself is not changed).

    Each surviving layer gets its rank nnz(g) in `rank_pattern` and α′ = α·nnz/r in `alpha_pattern`, so
    PEFT's scaling α′/nnz equals α/r (bit for bit where float64 allows, else to 1 ulp); pattern keys are escaped full module names, longest first
    (PEFT takes the first key that matches a name's end). A layer whose gates all died is left out
    (its branch adds 0; PEFT leaves that layer alone). The densely trained modules go in `modules_to_save`.

    Returns:
        The exported rank of each kept layer.
    """
    state = _state(model)
    config = state.config
    tensors, kept, kinds = {}, {}, set()
    for name, layer in layers(model).items():
        a, b = pruned_factors(layer)
        if a.shape[0] == 0:
            continue
        tensors[f"base_model.model.{name}.lora_A.weight"] = a.contiguous().cpu()
        tensors[f"base_model.model.{name}.lora_B.weight"] = b.contiguous().cpu()
        kept[name] = (a.shape[0], layer.scaling)
        kinds.add(layer.kind)
    if not kept:
        raise UsageError(
            "every gate of every layer is zero, so there is no low-rank adapter to export; export an earlier "
            "stage's checkpoint (smaller ξ), or use sora.merge(model) for the base with its densely trained modules"
        )
    for path, param in _saved_parameters(model, state.saved).items():
        tensors[f"base_model.model.{path}"] = param.detach().contiguous().cpu()
    order = sorted(kept, key=len, reverse=True)
    peft_config = {
        "peft_type": "LORA",
        "task_type": peft_task_type(model),
        "base_model_name_or_path": base_model_name_or_path or getattr(model, "name_or_path", None) or None,
        "r": config.r,
        "lora_alpha": config.lora_alpha,
        "lora_dropout": config.lora_dropout,
        "target_modules": "|".join(re.escape(n) for n in order),  # a regex string: PEFT full-matches it
        "rank_pattern": {re.escape(n): kept[n][0] for n in order},
        "alpha_pattern": {re.escape(n): _exact_alpha(kept[n][1], kept[n][0]) for n in order},
        "modules_to_save": state.saved or None,
        "fan_in_fan_out": kinds == {"conv1d"},  # PEFT corrects it per layer (with a warning) in mixed models
        "bias": "none",
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "inference_mode": True,
    }
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    atomic_write(directory / PEFT_WEIGHTS_FILE, lambda tmp: save_file(tensors, str(tmp), metadata={"format": "pt"}))
    text = json.dumps(peft_config, indent=2) + "\n"
    atomic_write(directory / PEFT_CONFIG_FILE, lambda tmp: tmp.write_text(text))
    return {n: kept[n][0] for n in kept}


