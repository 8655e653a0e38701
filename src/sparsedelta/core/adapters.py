"""Sparse deltas on a model: attaching them, routing gradients, switching, merging, unloading.

`add_delta` is the core verb: given positions per targeted tensor it creates one `SparseDelta`
per tensor (registered under its module as `sparse_delta.<adapter>.<param>`), freezes everything
else, and wraps each owner module's forward so the values receive their gradient. Several named
deltas (adapters) can live on one model; exactly one, or none, is merged at a time, and switching
costs O(k).
"""

from __future__ import annotations

import contextlib
import functools
import math
import random
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UnknownAdapterError, UsageError
from . import patching, quantized
from .config import DeltaConfig, SelectionReport
from .correction import bake_corrected, in_float32
from .delta import SparseDelta
from .ops import (
    AddDelta,
    ConvDelta,
    DeltaProduct,
    EmbeddingDelta,
    LinearCorrected,
    LinearDelta,
    QuantizedLinearDelta,
    compute_dtype,
    conv_padding,
    sampled_pays,
)
from .targeting import CONTAINER, Target, find_targets


@dataclass
class Adapter:
    config: DeltaConfig
    deltas: dict[str, SparseDelta]  # by parameter path
    saved: dict[str, nn.Parameter]  # dense modules_to_save tensors, by parameter path
    report: SelectionReport | None = None
    trainable: bool = True


@dataclass
class DeltaState:
    adapters: dict[str, Adapter] = field(default_factory=dict)
    active: str | None = None
    merged: bool = True
    base_saved: dict[str, nn.Parameter] = field(default_factory=dict)  # originals of saved modules
    owners: dict[str, list[tuple[nn.Module, str]]] = field(default_factory=dict)
    rng: random.Random = field(default_factory=lambda: random.Random(0))  # the model's own per-step choices


# (attach, detach) pairs run when a model gets its first delta and when its last one goes: how other
# core modules extend a model with deltas without this module importing them (mixed.py: adapter_names=)
MODEL_HOOKS: list[tuple[Callable[[nn.Module], None], Callable[[nn.Module], None]]] = []


def state_of(model: nn.Module) -> DeltaState:
    state = getattr(model, "_sparsedelta", None)
    if state is None:
        raise UsageError(
            "this model has no sparse delta; call sparsedelta.prepare(model, config) or sparsedelta.load first"
        )
    return state


# -- the forward layer ---------------------------------------------------------------------------------
LAYER_KEY = "sparsedelta"


def _linear(module, delta, path, x, bias_delta=None):
    weight, observer = module.weight, delta.grad_observer
    if observer is None:
        pattern = delta.csr() if sampled_pays(weight, len(delta.indices), compute_dtype(weight)) else None
    else:  # the observer's positions (the entries among them) as a sampled pattern, else the dense gradient
        offered = observer.sampled_pattern() if hasattr(observer, "sampled_pattern") else None
        pays = offered is not None and sampled_pays(weight, len(offered[1]), compute_dtype(weight))
        pattern = offered if pays else None
    if delta.holds_delta:
        return LinearDelta.apply(x, weight, module.bias, delta.values, delta.indices, path.transposed, pattern, observer)
    bias = module.bias if bias_delta is None else bias_delta.added_to(module.bias)
    return LinearCorrected.apply(x, weight, bias, delta.values, delta.indices, path.transposed, pattern,
                                 delta.every_entry(), observer)  # fmt: skip


def _embedding(module, delta, path, ids):
    every = None if delta.holds_delta else delta.every_entry()
    return EmbeddingDelta.apply(ids, module.weight, delta.values, delta.indices, module.padding_idx, every,
                                delta.grad_observer)  # fmt: skip


def _conv(module, delta, path, x):
    """nn.Conv1d/2d/3d with zero padding (patching.fast_path); a corrected kernel never comes here."""
    padding, extra = conv_padding(module.padding, module.kernel_size, module.dilation)
    unbatched = x.dim() == module.weight.dim() - 1  # e.g. (C, H, W) into a Conv2d
    if unbatched:
        x = x.unsqueeze(0)
    if extra is not None:  # 'same' with an even reach: the odd pixel goes right, outside the function
        x = F.pad(x, extra)
    y = ConvDelta.apply(x, module.weight, module.bias, delta.values, delta.indices,
                        module.stride, padding, module.dilation, module.groups, delta.grad_observer)  # fmt: skip
    return y.squeeze(0) if unbatched else y


FUSE_QUANTIZED = True  # False: always the layer's own forward + x Δᵀ (tests compare the two paths)


def _base_output(module, inner, args, kwargs):
    """The layer's output on θ. bitsandbytes' int8 layer on a CPU multiplies by its dequantized weight
    in training mode but quantizes its input rows to int8 too in eval mode (LLM.int8(); slower on a
    CPU, by bitsandbytes' own note, and worse: SaRA's default SmolLM2 job reached test perplexity
    22.34 evaluated so, 21.77 evaluated as trained). A layer carrying deltas therefore computes as in
    training mode in both modes, so a delta is evaluated as it was trained, and its base, `disabled`
    and mixed batches compute alike."""
    if quantized.scheme_of(module) == "int8" and not module.training and inner.plain and len(args) + len(kwargs) == 1:
        x = args[0] if args else next(iter(kwargs.values()))
        if x.device.type == "cpu":
            bias = module.bias
            return F.linear(x, quantized.dequantize(module).to(x.dtype), None if bias is None else bias.to(x.dtype))
    return inner(*args, **kwargs)


def _quantized(module, bound, inner, args, kwargs):
    """A quantized layer (core/quantized.py) with deltas. In float32 or under autocast, when nothing
    but its class's forward lies below and that forward multiplies by the dequantized weight: one
    product with θ dequantized and Δ added for the call (`QuantizedLinearDelta`; under autocast in
    its dtype, θ + Δ rounded to it as autocast rounds a float32 model's weights: a second product
    for x Δᵀ doubled the step), the bias (+ Δb) added. Otherwise the layer runs as it is, on θ, and
    the deltas' effect is added: x Δᵀ for the weight (`DeltaProduct`), Δb for the bias, in float32,
    the sum cast to the layer's dtype.

    On CUDA bitsandbytes' int8 layer multiplies int8 by int8 (its input rows quantized too) in
    either mode: there it keeps its own forward and gets x Δᵀ added (`_base_output`)."""
    x = args[0] if args else next(iter(kwargs.values()))
    weight_delta = next((d for p, d in bound if p == "weight"), None)
    own_int8 = quantized.scheme_of(module) == "int8" and x.device.type != "cpu"
    fused = (FUSE_QUANTIZED and inner.plain and not own_int8 and weight_delta is not None and len(args) + len(kwargs) == 1
             and (x.dtype == torch.float32 or torch.is_autocast_enabled(x.device.type)))  # fmt: skip
    if fused:
        bias_delta = next((d for p, d in bound if p == "bias"), None)
        bias = module.bias if bias_delta is None else bias_delta.added_to(module.bias)
        sampled = sampled_pays(quantized.stand_in(weight_delta.weight), len(weight_delta.indices), torch.float32)
        return QuantizedLinearDelta.apply(x, weight_delta.values, bias, weight_delta.indices,
                                          weight_delta.csr() if sampled else None, weight_delta.every_entry(),
                                          functools.partial(quantized.dequantize, module))  # fmt: skip
    y = _base_output(module, inner, args, kwargs)
    extra = None
    for pname, delta in bound:
        if pname == "weight":
            sampled = sampled_pays(quantized.stand_in(delta.weight), len(delta.indices), torch.float32)
            pattern = delta.csr() if sampled else None
            part = DeltaProduct.apply(x, delta.values, delta.indices, delta.shape, pattern, delta.every_entry())
        else:  # the layer's float bias: its entries added to every output
            part = delta.added_to(torch.zeros(delta.shape, device=y.device))
        extra = part if extra is None else extra + part
    return y + extra.to(y.dtype) if y.dtype == torch.float32 else (y.float() + extra).to(y.dtype)


FAST = {"linear": _linear, "embedding": _embedding, "conv": _conv}
CORRECTED_FAST = ("linear", "embedding")  # kinds whose fast path also adds a corrected delta


class DeltaLayer:
    """A module's patching layer: keeps the active adapter's merged weights current and routes the
    gradient to its values (the fast path of the module's type, else through `AddDelta`). A
    corrected delta (a weight that holds θ only: bf16/fp16 or sharded) is added in the forward, also
    without gradients: by the fast path's own correction, else by running the module in float32
    on θ + delta (`_in_float32`)."""

    __slots__ = ("bindings", "active")

    def __init__(self):
        self.bindings: dict[str, list[tuple[str, SparseDelta]]] = {}  # adapter -> (parameter name, delta)
        self.active: str | None = None

    def __call__(self, module: nn.Module, inner, *args, **kwargs):
        bound = self.bindings.get(self.active, ())
        corrected = []
        for name, delta in bound:
            delta.sync()
            if not delta.holds_delta:
                corrected.append(name)
        training = torch.is_grad_enabled() and any(d.values.requires_grad for _, d in bound)
        if not bound or not (training or corrected):  # weights are merged: the ordinary forward is exact
            return _base_output(module, inner, args, kwargs) if quantized.scheme_of(module) else inner(*args, **kwargs)
        path = patching.fast_path(module) if inner.plain else None
        fast_delta = next((d for p, d in bound if p == "weight"), None) if path else None
        if corrected:
            return self._corrected(module, inner, bound, corrected, path, fast_delta, args, kwargs)
        swapped = []
        try:
            for pname, delta in bound:
                if delta is fast_delta:
                    continue
                original = module._parameters[pname]
                module._parameters[pname] = AddDelta.apply(original, delta.values, delta.indices, delta.grad_observer)
                swapped.append((pname, original))
            if fast_delta is not None:
                x = args[0] if args else next(iter(kwargs.values()))
                return FAST[path.kind](module, fast_delta, path, x)
            return inner(*args, **kwargs)
        finally:
            for pname, original in swapped:
                module._parameters[pname] = original

    @staticmethod
    def _corrected(module, inner, bound, corrected, path, fast_delta, args, kwargs):
        if quantized.scheme_of(module):  # whatever lies below: its packed weight can only be run
            return _quantized(module, bound, inner, args, kwargs)
        others = {pname: d for pname, d in bound if d is not fast_delta}
        fast = fast_delta is not None and "weight" in corrected and path.kind in CORRECTED_FAST
        if fast and (not others or (path.kind == "linear" and set(others) == {"bias"} and "bias" in corrected)):
            x = args[0] if args else next(iter(kwargs.values()))
            if path.kind == "linear":
                return _linear(module, fast_delta, path, x, others.get("bias"))
            return _embedding(module, fast_delta, path, x)
        return in_float32(module, inner, dict(bound), args, kwargs)


def delta_layer(module: nn.Module) -> DeltaLayer:
    """The module's DeltaLayer, added on first use."""
    layer = patching.layer_of(module, LAYER_KEY)
    if layer is None:
        layer = DeltaLayer()
        patching.wrap(module, LAYER_KEY, layer)
    return layer


# -- attaching -------------------------------------------------------------------------------------
def add_delta(
    model: nn.Module,
    config: DeltaConfig,
    positions: dict[str, torch.Tensor] | None = None,
    adapter_name: str = "default",
    values: dict[str, torch.Tensor] | None = None,
    report: SelectionReport | None = None,
    trainable: bool = True,
) -> nn.Module:
    """Attach a delta named `adapter_name` at `positions` (parameter path -> flat positions; by
    default chosen by `config.select`), make it the active one, and freeze everything else."""
    if "." in adapter_name or not adapter_name:
        raise UsageError(f"adapter name {adapter_name!r} must be non-empty and contain no '.'")
    state: DeltaState | None = getattr(model, "_sparsedelta", None)
    if state is not None and adapter_name in state.adapters:
        raise UsageError(
            f"adapter {adapter_name!r} exists already; pick another name or call sparsedelta.delete_adapter first"
        )
    targets, saved_modules = find_targets(model, config)
    quantized.keep_packing(model)  # θ of a quantized base stays the θ the delta is taken over
    if positions is None:
        # quantized weights are dequantized as the rule reads them, one at a time
        owned = {name: (t.param, t.owners[0][0]) for name, t in targets.items()}
        positions, report = config.select(quantized.Dequantized(owned))
    unknown = set(positions) - set(targets)
    if unknown:
        raise UsageError(f"positions given for tensors that are not targeted: {sorted(unknown)[:5]}")
    positions = {name: idx for name, idx in positions.items() if len(idx)}  # a tensor may get no entry
    if not positions:
        raise UsageError("the selection picked no entry at all; loosen the threshold or raise the density")

    if state is None:
        state = DeltaState()
        model._sparsedelta = state
        for attach, _ in MODEL_HOOKS:
            attach(model)
        for p in model.parameters():
            p.requires_grad_(False)
    with all_unmerged(model):  # capture θ, not another adapter's merged values
        deltas = {}
        for name, idx in positions.items():
            target: Target = targets[name]
            owner, pname = target.owners[0]
            layer = owner if quantized.is_quantized_param(target.param) else None
            theta = quantized.dequantize(layer) if layer is not None else None
            delta = SparseDelta(target.param, idx, None if values is None else values.get(name), theta=theta, layer=layer)
            del theta  # the delta keeps θ at its positions only
            if CONTAINER not in owner._modules:
                setattr(owner, CONTAINER, nn.ModuleDict())
            container = getattr(owner, CONTAINER)
            if adapter_name not in container:
                container[adapter_name] = nn.ModuleDict()
            container[adapter_name][pname] = delta
            for module, owned_name in target.owners:
                delta_layer(module).bindings.setdefault(adapter_name, []).append((owned_name, delta))
            state.owners[name] = target.owners
            deltas[name] = delta
    saved = _make_saved(model, state, saved_modules)
    state.adapters[adapter_name] = Adapter(config, deltas, saved, report, trainable)
    set_adapter(model, adapter_name)
    return model


def _make_saved(model: nn.Module, state: DeltaState, module_names: list[str]) -> dict[str, nn.Parameter]:
    originals = {path: state.base_saved.setdefault(path, p) for path, p in module_parameters(model, module_names).items()}
    return dense_copies(originals)


def module_parameters(model: nn.Module, module_names: list[str]) -> dict[str, nn.Parameter]:
    """The current parameters of the named modules (modules_to_save), by parameter path."""
    return {
        f"{name}.{pname}": param
        for name in module_names
        for pname, param in model.get_submodule(name).named_parameters(recurse=False)
    }


def dense_copies(tensors: dict[str, nn.Parameter]) -> dict[str, nn.Parameter]:
    """Trainable copies: a densely trained module is trained on a copy, so the base stays intact."""
    return {path: nn.Parameter(t.detach().clone()) for path, t in tensors.items()}


def install_tensors(model: nn.Module, tensors: dict[str, nn.Parameter]) -> None:
    """Put these parameters in place (by parameter path) in their modules."""
    for path, param in tensors.items():
        module_name, _, pname = path.rpartition(".")
        model.get_submodule(module_name)._parameters[pname] = param


# -- switching -------------------------------------------------------------------------------------
def set_adapter(model: nn.Module, adapter_name: str | None) -> None:
    """Make `adapter_name` the merged, active delta (None: the base model). Costs O(k)."""
    state = state_of(model)
    if adapter_name is not None and adapter_name not in state.adapters:
        raise UnknownAdapterError(f"no adapter {adapter_name!r}; this model has {sorted(state.adapters)}")
    old = state.adapters.get(state.active)
    if old is not None and state.merged:
        for delta in old.deltas.values():
            delta.unmerge()
    state.active = adapter_name
    for name, adapter in state.adapters.items():
        on = name == adapter_name
        for delta in adapter.deltas.values():
            delta.values.requires_grad_(on and adapter.trainable)
        for p in adapter.saved.values():
            p.requires_grad_(on and adapter.trainable)
    install_tensors(model, state.base_saved)
    new = state.adapters.get(adapter_name)
    if new is not None and state.merged:
        for delta in new.deltas.values():
            delta.merge()
        install_tensors(model, new.saved)
    for owners in state.owners.values():
        for module, _ in owners:
            delta_layer(module).active = adapter_name if state.merged else None


def unmerge(model: nn.Module) -> None:
    """Restore the base weights while keeping every delta attached (bit-exact)."""
    state = state_of(model)
    active = state.active
    set_adapter(model, None)
    state.active, state.merged = active, False
    set_adapter(model, active)


def merge(model: nn.Module) -> None:
    """Merge the active delta back into the weights after `unmerge`."""
    state = state_of(model)
    state.merged = True
    set_adapter(model, state.active)


@contextlib.contextmanager
def disabled(model: nn.Module):
    """Run the base model: `with sparsedelta.disabled(model): base_logits = model(x)`."""
    state = state_of(model)
    was_merged = state.merged
    unmerge(model)
    try:
        yield model
    finally:
        if was_merged:
            merge(model)


@contextlib.contextmanager
def all_unmerged(model: nn.Module):
    """Every delta out of the weights, then as it was (nothing to do when none is merged)."""
    state: DeltaState | None = getattr(model, "_sparsedelta", None)
    if state is None or state.active is None or not state.merged:
        yield
        return
    with disabled(model):
        yield


def sync(model: nn.Module) -> None:
    """Write the active delta's current values into the weights (done by every forward anyway)."""
    state = state_of(model)
    adapter = state.adapters.get(state.active)
    if adapter is not None:
        for delta in adapter.deltas.values():
            delta.sync()


def delete_adapter(model: nn.Module, adapter_name: str) -> None:
    state = state_of(model)
    if adapter_name not in state.adapters:
        raise UnknownAdapterError(f"no adapter {adapter_name!r}; this model has {sorted(state.adapters)}")
    if state.active == adapter_name:
        set_adapter(model, None)
    adapter = state.adapters.pop(adapter_name)
    for path in adapter.deltas:
        for module, _ in state.owners[path]:
            delta_layer(module).bindings.pop(adapter_name, None)
        container = getattr(state.owners[path][0][0], CONTAINER)
        if adapter_name in container:
            del container[adapter_name]


def _remove_all(model: nn.Module) -> None:
    state = state_of(model)
    for _, detach in MODEL_HOOKS:
        detach(model)
    for owners in state.owners.values():
        for module, _ in owners:
            patching.unwrap(module, LAYER_KEY)
            if CONTAINER in module._modules:
                del module._modules[CONTAINER]
    del model._sparsedelta


def merge_and_unload(model: nn.Module, dequantize: bool = False) -> nn.Module:
    """Make the active delta permanent and return a plain model without any sparsedelta parts.

    On a bfloat16/float16 base the merged weights are θ + delta rounded to that dtype, a different
    model from the one trained (entries far below θ's last bit are lost): a warning says how many
    entries lost more than half of their change. For the exact model call `model.float()` first.

    A quantized base cannot take θ + delta in its packed weights: refused, unless `dequantize`, which
    replaces every quantized layer by a float32 `nn.Linear` holding its dequantized θ with the delta
    added: exactly the function trained, at 4 bytes a weight."""
    state = state_of(model)
    adapter = state.adapters.get(state.active)
    packed = {p: d for p, d in adapter.deltas.items() if d.quantized} if adapter is not None else {}
    if packed and not dequantize:
        raise UsageError(
            "merge_and_unload: the base is quantized, and its packed weights cannot take the delta; keep the delta "
            "unmerged over the quantized base (sparsedelta.load), or pass dequantize=True for a float32 model "
            "(θ dequantized + the delta: the function trained, 4 bytes a weight)"
        )
    if not state.merged:
        merge(model)
    sync(model)
    entries = {id(state.owners[p][0][0]): d.every_entry() for p, d in packed.items()}
    if adapter is not None:
        bake_corrected({p: d for p, d in adapter.deltas.items() if not d.quantized})
    _remove_all(model)
    if dequantize:
        quantized.dequantize_model(model, entries=entries)
    return model


def use_correction(model: nn.Module) -> None:
    """Apply every delta of the model as a correction in the forward (y = θx + Δx), never written into
    the weights: what sharding the frozen base needs (FSDP), as no process holds a whole weight."""
    for adapter in state_of(model).adapters.values():
        for delta in adapter.deltas.values():
            delta.use_correction()


def unload(model: nn.Module) -> nn.Module:
    """Remove every delta and return the base model, bit-exact."""
    set_adapter(model, None)
    _remove_all(model)
    return model


# -- inspection ------------------------------------------------------------------------------------
def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The active adapter's trainable tensors: delta values and densely trained modules."""
    state = state_of(model)
    adapter = state.adapters.get(state.active)
    if adapter is None or not adapter.trainable:  # loaded frozen: nothing trains
        return []
    return [d.values for d in adapter.deltas.values()] + list(adapter.saved.values())


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable entries of the active adapter, entries of the base model)."""
    state = getattr(model, "_sparsedelta", None)
    delta_params = set()
    if state is not None:
        for adapter in state.adapters.values():
            delta_params |= {id(d.values) for d in adapter.deltas.values()}
    total = sum(math.prod(quantized.logical_shape(p)) for p in model.parameters() if id(p) not in delta_params)
    trainable = sum(p.numel() for p in trainable_parameters(model)) if state is not None else total
    return trainable, total


def print_trainable_parameters(model: nn.Module) -> None:
    trainable, total = count_parameters(model)
    print(f"trainable params: {trainable:,} || all params: {total:,} || trainable%: {100 * trainable / total:.4f}")
