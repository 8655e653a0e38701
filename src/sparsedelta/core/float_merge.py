"""A delta trained over a quantized base, merged into the float checkpoint that base was quantized
from: θ_float + Δ at the delta's positions, θ_float elsewhere.

That is not the function trained: the delta was trained against the dequantized weights θ_deq, so
the merged model differs from the quantized base + delta by θ_float − θ_deq in every quantized layer
(the quantization error, which the delta may have learnt to work around). `merge_into_float_base`
measures that difference in the weights; `compare_outputs` measures what it does to the outputs. The
exact float model is `merge_and_unload(model, dequantize=True)` (θ_deq + Δ).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import UsageError
from . import quantized
from .adapters import state_of


@dataclass
class WeightError:
    """‖θ_float − θ_deq‖ / ‖θ_float‖ of each quantized layer (Frobenius norms) and of all of them together."""

    layers: dict[str, float]
    overall: float

    def largest(self) -> tuple[str, float]:
        return max(self.layers.items(), key=lambda item: item[1])


@dataclass
class OutputError:
    """How far the float merge's outputs are from the exact model's (quantized base + delta) on the
    same inputs: mean and largest |Δ logits| over every logit, and the fraction of rows (tokens, or
    examples for a classifier) where both give the same top-1 class."""

    mean_abs: float
    max_abs: float
    top1_agreement: float
    rows: int


def merge_into_float_base(model: nn.Module, float_model: nn.Module) -> WeightError:
    """Write the active delta of `model` (trained over a quantized base) into `float_model`, the
    float checkpoint that base was quantized from, in place: θ_float + Δ at the delta's positions,
    θ_float elsewhere, and the densely trained modules (a new head) copied. `model` is left as it is.

    Returns the relative weight difference ‖θ_float − θ_deq‖ / ‖θ_float‖ per quantized layer: what
    the merged model holds that the trained one did not (see the module doc). Everything is checked
    before anything is written: `float_model` must have every quantized layer as an `nn.Linear`
    whose weight quantizes to exactly that layer's codes, and every tensor of the delta."""
    adapter = _active_adapter(model)
    layers = {name: layer for name, layer in model.named_modules() if quantized.scheme_of(layer)}
    float_layers = {name: _float_twin(float_model, name, layer) for name, layer in layers.items()}
    params = dict(float_model.named_parameters())
    for path in [*adapter.deltas, *adapter.saved]:
        if path not in params:
            raise UsageError(f"the float model has no tensor {path}, which the delta holds; pass the model the base was quantized from")
    error = _weight_error(layers, float_layers)
    with torch.no_grad():
        for path, delta in adapter.deltas.items():
            positions, values = delta.every_entry()
            flat = params[path].data.view(-1)
            flat[positions] = (flat[positions].float() + values).to(flat.dtype)
        for path, tensor in adapter.saved.items():
            params[path].data.copy_(tensor.detach())
    return error


def compare_outputs(exact: nn.Module, merged: nn.Module, inputs: Iterable[dict]) -> OutputError:
    """Run both models on each batch of keyword inputs (no gradients) and compare their logits."""
    total, largest, count, agree, rows = 0.0, 0.0, 0, 0, 0
    with torch.no_grad():
        for batch in inputs:
            a, b = exact(**batch).logits.float(), merged(**batch).logits.float()
            diff = (a - b).abs()
            total, count = total + float(diff.sum()), count + diff.numel()
            largest = max(largest, float(diff.max()))
            same = a.argmax(-1) == b.argmax(-1)
            agree, rows = agree + int(same.sum()), rows + same.numel()
    if not rows:
        raise UsageError("no inputs to compare the models on")
    return OutputError(total / count, largest, agree / rows, rows)


def _active_adapter(model: nn.Module):
    state = getattr(model, "_sparsedelta", None)
    adapter = state_of(model).adapters.get(state.active) if state is not None else None
    if adapter is None:
        raise UsageError("the model has no active delta to merge; load one (sparsedelta.load) or set_adapter first")
    if not any(delta.quantized for delta in adapter.deltas.values()):
        raise UsageError(
            "this delta's base is not quantized: merge_and_unload(model) writes θ + Δ into it exactly; "
            "merging into a float base is for deltas trained over an int8 or 4-bit base"
        )
    return adapter


def _float_twin(float_model: nn.Module, name: str, layer: nn.Module) -> nn.Linear:
    """The float model's layer `name`, checked to be the one `layer` was quantized from."""
    try:
        twin = float_model.get_submodule(name)
    except AttributeError:
        twin = None
    if type(twin) is not nn.Linear:
        found = "nothing" if twin is None else type(twin).__name__
        raise UsageError(
            f"the float model has {found} at {name}, where the quantized base has a {type(layer).__name__}; pass the "
            "unquantized model the base was made from (not a quantized one)"
        )
    if tuple(twin.weight.shape) != quantized.logical_shape(layer.weight) or not quantized.quantizes_to(layer, twin.weight):
        raise UsageError(
            f"{name}: the float model's weight does not quantize to the quantized base's codes, so it is not the "
            "checkpoint that base was made from (or was quantized with other settings or in another dtype); pass "
            "that checkpoint (--model)"
        )
    return twin


def _weight_error(layers: dict[str, nn.Module], float_layers: dict[str, nn.Linear]) -> WeightError:
    """One dequantized layer at a time."""
    per_layer, difference, size = {}, 0.0, 0.0
    for name, layer in layers.items():
        theta = float_layers[name].weight.detach().float()
        diff = float(torch.linalg.vector_norm(theta - quantized.dequantize(layer)).double() ** 2)
        norm = float(torch.linalg.vector_norm(theta).double() ** 2)
        per_layer[name] = math.sqrt(diff / norm) if norm else 0.0
        difference, size = difference + diff, size + norm
    return WeightError(per_layer, math.sqrt(difference / size) if size else 0.0)
