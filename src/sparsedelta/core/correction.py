"""Corrected deltas (a bfloat16/float16 or sharded weight that holds θ, not θ + delta; see
core/delta.py): the generic forward path, which runs a module in float32 on θ + delta, and folding
such deltas into their low-precision weights for good, with a warning of what the rounding spoils.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from .delta import SparseDelta
from .ops import AddDelta


def in_float32(module: nn.Module, inner, deltas: dict[str, SparseDelta], args, kwargs):
    """Run the module in float32 on θ + delta (autocast off), its output cast back to its input's
    dtype: the generic path of a corrected delta (norms, biases, convolutions), whose weight cannot
    hold the delta. Costs a float32 copy of the module's own parameters for the call."""
    swapped = []
    floats = [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor) and a.is_floating_point()]
    try:
        for pname, param in list(module._parameters.items()):
            if param is None or not param.is_floating_point():
                continue
            delta = deltas.get(pname)
            if delta is None:
                new = param.float()
            elif delta.holds_delta:
                new = AddDelta.apply(param, delta.values, delta.indices, delta.grad_observer).float()
            else:
                new = delta.added_to(param)
                if delta.grad_observer is not None and new.requires_grad:
                    new.register_hook(_observing(delta.grad_observer))
            module._parameters[pname] = new
            swapped.append((pname, param))
        with torch.autocast(floats[0].device.type if floats else "cpu", enabled=False):
            out = inner(*_floats_to(args, torch.float32), **_floats_to(kwargs, torch.float32))
    finally:
        for pname, original in swapped:
            module._parameters[pname] = original
    return _floats_to(out, floats[0].dtype) if floats else out


def _observing(observer):
    """A tensor hook that shows the gradient of θ + delta (the weight's dense gradient) to `observer`."""

    def hook(grad):
        with torch.no_grad():
            observer(grad)

    return hook


def _floats_to(obj, dtype: torch.dtype):
    """Floating tensors in a tensor, tuple, list or dict cast to `dtype`; anything else as it is."""
    if isinstance(obj, torch.Tensor):
        return obj.to(dtype) if obj.is_floating_point() else obj
    if isinstance(obj, (tuple, list)):
        return type(obj)(_floats_to(o, dtype) for o in obj)
    if isinstance(obj, dict):
        return {k: _floats_to(v, dtype) for k, v in obj.items()}
    return obj


def bake_corrected(deltas: dict[str, SparseDelta]) -> None:
    """Write θ + delta, rounded, into the low-precision weights of corrected deltas, and warn how many
    entries' changes the rounding spoils."""
    lost = total = 0
    dtypes = set()
    for delta in deltas.values():
        if delta.holds_delta:
            continue
        positions, base, values = delta.all_entries()
        exact = base.float() + values.float()
        rounded = exact.to(delta.weight.dtype)
        lost += int(((rounded.float() - exact).abs() > 0.5 * values.float().abs()).sum())
        total += len(positions)
        dtypes.add(str(delta.weight.dtype).removeprefix("torch."))
        with torch.no_grad():
            delta.weight.view(-1).put_(positions, rounded)
    if lost:
        warnings.warn(
            f"merging into a {'/'.join(sorted(dtypes))} base: {lost:,} of {total:,} delta entries are off by more than "
            "half of their change after rounding, so the merged model differs from the trained one; call model.float() "
            "before merge_and_unload for the exact merged model, or keep the delta unmerged (sparsedelta.load)",
            stacklevel=3,
        )
