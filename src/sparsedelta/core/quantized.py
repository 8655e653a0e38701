"""Quantized bases (bitsandbytes' `Linear8bitLt`, int8, and `Linear4bit`, nf4 or fp4): what the core
needs to know about them, without importing bitsandbytes unless a model holds such a layer.

A quantized weight cannot hold θ + delta, so a delta over it is always a *correction* (as over a
bf16 weight, core/delta.py): the layer computes y = base_layer(x) + x Δᵀ, its packed weight is never
written, and gradients reach the delta's values only. Positions, selection rules and the base
fingerprint read the *dequantized* θ, one layer at a time (`dequantize`), never the whole model.
"""

from __future__ import annotations

import functools
import logging
import re
from collections.abc import Iterator, Mapping

import torch
from torch import nn

from ..errors import UsageError

SCHEMES = ("int8", "4bit")  # --base-quantization; 4bit is nf4 (QLoRA's data type)
_LINEARS = {  # by qualified name (subclasses included), so the core needs no import of bitsandbytes
    "bitsandbytes.nn.modules.Linear8bitLt": "int8",
    "bitsandbytes.nn.modules.Linear4bit": "4bit",
}
_PARAMS = {"bitsandbytes.nn.modules.Int8Params", "bitsandbytes.nn.modules.Params4bit"}


# What bitsandbytes (0.50.2) makes the libraries log on a CPU that tells a user of sparsedelta nothing
# to act on, by logger and the start of its message; dropped there, everything else passes.
BITSANDBYTES_NOISE = {
    # at import, on CPUs with AVX512-BF16: no download of an optional kernel for repacked 4-bit
    # weights, a packing keep_packing turns off anyway (no network, or kernels' trust check)
    "bitsandbytes.backends.cpu.ops": ("Failed to load CPU gemm_4bit_forward from kernels-community",),
    # the same attempt, logged by the `kernels` package when the hub is offline (HF_HUB_OFFLINE)
    "kernels._internals.hf_hub": ("Skipping publisher trust check for 'kernels-community/quantization-bitsandbytes'",),
    # at every eval-mode forward of an int8 layer without a delta (a run's baseline, `disabled`):
    # LLM.int8() quantizes its input rows through fp16, as docs/precision.md says
    "bitsandbytes.autograd._functions": ("MatMul8bitLt: inputs will be cast from",),
}


class _DropMessages(logging.Filter):
    def __init__(self, starts: tuple[str, ...]):
        super().__init__()
        self.starts = starts

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.starts)


def quiet_bitsandbytes() -> None:
    """Drop BITSANDBYTES_NOISE from bitsandbytes' loggers (before bitsandbytes is imported: one
    message comes at its import); idempotent."""
    for name, starts in BITSANDBYTES_NOISE.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropMessages) for f in logger.filters):
            logger.addFilter(_DropMessages(starts))


quiet_bitsandbytes()  # whoever imports bitsandbytes first (transformers' BitsAndBytesConfig, or quantize)


def _qualified(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def scheme_of(module: nn.Module) -> str | None:
    """'int8' or '4bit' for a bitsandbytes quantized linear layer (or a subclass), else None."""
    return _scheme_of_type(type(module))


@functools.cache
def _scheme_of_type(cls: type) -> str | None:  # asked at every forward of a layer with deltas
    return next((_LINEARS[_qualified(c)] for c in cls.__mro__ if _qualified(c) in _LINEARS), None)


def is_quantized_param(param: torch.Tensor) -> bool:
    """Whether this parameter is a bitsandbytes quantized weight holding its packed data."""
    return any(_qualified(c) in _PARAMS for c in type(param).__mro__) and not param.is_floating_point()


def is_quantized(model: nn.Module) -> bool:
    """Whether any layer of the model is a bitsandbytes quantized linear layer."""
    return any(scheme_of(m) for m in model.modules())


def dtype_name(param: torch.Tensor) -> str:
    """The name a delta file records for the base's storage: 'int8', 'nf4', 'fp4', or the float dtype."""
    if not is_quantized_param(param):
        return str(param.dtype).removeprefix("torch.")
    state = getattr(param, "quant_state", None)
    return "int8" if state is None else state.quant_type


def logical_shape(param: torch.Tensor) -> tuple[int, ...]:
    """The shape of the weight the parameter stands for: a 4-bit weight packs two entries a byte."""
    state = getattr(param, "quant_state", None)
    if is_quantized_param(param) and state is not None:
        return tuple(state.shape)
    return tuple(param.shape)


def dequantize(layer: nn.Module | torch.Tensor) -> torch.Tensor:
    """θ of a quantized layer's weight (give the layer: an int8 layer moves its row scales from the
    weight to its own state at its first forward) as a new float32 tensor of its logical shape, one
    layer's worth of memory; any other weight as it is, detached."""
    param = layer.weight if isinstance(layer, nn.Module) else layer
    if not is_quantized_param(param):
        return param.detach()
    import bitsandbytes.functional as bnbf

    with torch.no_grad():
        state = getattr(param, "quant_state", None)
        if state is not None:
            _check_unpacked(state)
            return bnbf.dequantize_4bit(param.data, state).float()
        scales = getattr(param, "SCB", None)
        if scales is None and isinstance(layer, nn.Module):
            scales = getattr(getattr(layer, "state", None), "SCB", None)
        if scales is None:
            raise UsageError(
                "this int8 weight holds no row scales (SCB): pass its layer (after a forward they live in "
                "layer.state), or move the model to its device first (bitsandbytes quantizes on .to())"
            )
        return bnbf.int8_vectorwise_dequant(param.data, scales).float()


def scale_bytes(layer: nn.Module) -> torch.Tensor:
    """The raw bytes of a quantized layer's scales (4-bit: the block scales, and with double
    quantization their own scales and offset; int8: the row scales). A delta over a quantized base
    fingerprints them with θ at its positions: SaRA's smallest |θ| over nf4 are mostly the zero code,
    whose θ is 0 in any checkpoint, while the scales tell checkpoints (and quantization settings) apart."""
    param = layer.weight
    state = getattr(param, "quant_state", None)
    if state is None:
        scales = [param.SCB if getattr(param, "SCB", None) is not None else layer.state.SCB]
    else:
        _check_unpacked(state)
        scales = [state.absmax]
        if state.nested:
            scales += [state.state2.absmax, torch.as_tensor(state.offset, dtype=torch.float32)]
    return torch.cat([s.detach().contiguous().cpu().reshape(-1).view(torch.uint8) for s in scales])


def fingerprint_values(layer: nn.Module, base: torch.Tensor) -> torch.Tensor:
    """What a delta over a quantized layer hashes as its base fingerprint: θ at its positions (as
    float32 bytes), then the layer's scale bytes."""
    return torch.cat([base.detach().float().contiguous().cpu().view(torch.uint8), scale_bytes(layer)])


def quantizes_to(layer: nn.Module, weight: torch.Tensor) -> bool:
    """Whether the float `weight` quantizes to exactly the codes `layer` holds, with the layer's own
    settings (4-bit: its data type, block size, double quantization and input dtype; int8: per-row
    absmax of the fp16 weight, as bitsandbytes does): whether it is the checkpoint the layer was made from."""
    import bitsandbytes.functional as bnbf

    param = layer.weight
    state = getattr(param, "quant_state", None)
    with torch.no_grad():
        w = weight.detach().to(param.device)
        if state is None:
            codes = bnbf.int8_vectorwise_quant(w.to(torch.float16).contiguous())[0]
        else:
            _check_unpacked(state)
            codes = bnbf.quantize_4bit(w.to(state.dtype).contiguous(), blocksize=state.blocksize, compress_statistics=state.nested,
                                       quant_type=state.quant_type, quant_storage=param.data.dtype)[0]  # fmt: skip
    return codes.shape == param.data.shape and torch.equal(codes.view(torch.uint8), param.data.view(torch.uint8))


def _check_unpacked(state) -> None:
    if getattr(state, "packing_format_for_cpu", False):
        raise UsageError(
            "this 4-bit layer was repacked by bitsandbytes for its CPU inference kernel (at an eval-mode forward "
            "without gradients), which rounds its block scales to bf16, so its θ is no longer the one it was "
            "quantized to; quantize the model again and attach deltas (or call keep_packing(model)) before such a forward"
        )


def keep_packing(model: nn.Module) -> None:
    """Keep every 4-bit layer of the model in the packing it was quantized to. On CPUs with
    AVX512-BF16, bitsandbytes repacks a 4-bit weight in place at its first eval-mode forward without
    gradients, for a faster kernel, and rounds its block scales to bf16 on the way: θ itself changes
    (and layers with fewer than 64 inputs fail). A delta's positions, base values and fingerprint
    describe the θ it was trained on, so that repacking is turned off; it costs 4-bit inference that
    kernel's speed."""
    for module in model.modules():
        if scheme_of(module) == "4bit":
            _check_unpacked(module.weight.quant_state)
            if hasattr(module, "support_avx512bf16_for_cpu"):
                module.support_avx512bf16_for_cpu = False


def stand_in(param: torch.Tensor) -> torch.Tensor:
    """A float32 tensor of the weight's logical shape and device taking no memory (every entry one
    shared zero): for code that reads a weight's shape, dtype and device only."""
    return torch.zeros((), device=param.device).expand(logical_shape(param))


class Dequantized(Mapping):
    """Targeted tensors by name, each quantized one dequantized when read and not kept: a selection
    rule that walks it holds one dequantized layer at a time (plus whatever it keeps of it).
    `params`: name -> (the tensor, the layer that owns it)."""

    def __init__(self, params: dict[str, tuple[torch.Tensor, nn.Module]]):
        self._params = params
        self.lazy = any(is_quantized_param(p) for p, _ in params.values())  # selection.scores_of: score as read

    def __getitem__(self, name: str) -> torch.Tensor:
        param, layer = self._params[name]
        return dequantize(layer) if is_quantized_param(param) else param.detach()

    def __iter__(self) -> Iterator[str]:
        return iter(self._params)

    def __len__(self) -> int:
        return len(self._params)


# -- quantizing a loaded model ------------------------------------------------------------------------
def _load_bitsandbytes():
    try:
        import bitsandbytes
    except ImportError:
        raise UsageError(
            "quantized bases need bitsandbytes: pip install 'sparsedelta[quant]' (bitsandbytes>=0.50.2)"
        ) from None
    return bitsandbytes


def quantize(model: nn.Module, scheme: str, skip: list[str] | tuple[str, ...] = ()) -> nn.Module:
    """Replace the model's `nn.Linear` layers by bitsandbytes ones holding their weights quantized
    ('int8': Linear8bitLt, per-row absmax; '4bit': Linear4bit, nf4 in blocks of 64 with
    double-quantized scales, as QLoRA), in place; returns the model.

    For a model already loaded in float (a GGUF file, which transformers will not combine with a
    BitsAndBytesConfig). Kept in float: the output embeddings (the LM head, often tied to the input
    embeddings) and the modules named in `skip` (last name parts or full names, e.g. a new
    classification head trained densely). Biases stay float; the 4-bit layers compute in the dtype
    their weight had."""
    if scheme not in SCHEMES:
        raise UsageError(f"unknown base quantization {scheme!r}; choose one of {list(SCHEMES)}")
    if is_quantized(model):
        raise UsageError("this model is quantized already; pass it as it is (its layers are kept)")
    bnb = _load_bitsandbytes()
    kept = set()
    output = getattr(model, "get_output_embeddings", lambda: None)()
    if output is not None:
        kept.add(id(output))
    patterns = [re.compile(rf"(^|.*\.){re.escape(s)}$") for s in skip]
    replaced = 0
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            path = f"{name}.{child_name}" if name else child_name
            if type(child) is not nn.Linear or id(child) in kept or any(p.match(path) for p in patterns):
                continue
            setattr(module, child_name, _quantized_linear(bnb, child, scheme))
            replaced += 1
    if not replaced:
        raise UsageError("the model has no nn.Linear layer to quantize (besides the ones kept in float)")
    keep_packing(model)
    return model


def _quantized_linear(bnb, linear: nn.Linear, scheme: str) -> nn.Module:
    weight = linear.weight.detach()
    bias = linear.bias is not None
    if scheme == "int8":  # threshold 0: no outlier columns in float, every entry int8
        layer = bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, bias=bias, has_fp16_weights=False, threshold=0.0)
        layer.weight = bnb.nn.Int8Params(weight.float().clone(), requires_grad=False, has_fp16_weights=False)
    else:
        layer = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=bias, compute_dtype=weight.dtype,
                                  compress_statistics=True, quant_type="nf4")  # fmt: skip
        layer.weight = bnb.nn.Params4bit(weight.clone(), requires_grad=False, quant_type="nf4", compress_statistics=True)
    if bias:
        layer.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
    layer.train(linear.training)  # int8 layers compute otherwise in eval mode (see adapters._quantized)
    return layer.to(weight.device)  # bitsandbytes quantizes on the move to a device


def dequantize_model(
    model: nn.Module, dtype: torch.dtype = torch.float32, entries: dict[int, tuple[torch.Tensor, torch.Tensor]] | None = None
) -> nn.Module:
    """Replace every quantized linear layer by an `nn.Linear` holding its dequantized θ in `dtype`,
    in place, one layer at a time; returns the model, which computes what the quantized one did (in
    float32, exactly: both multiply by the dequantized weight). `entries`: id(layer) -> (flat
    positions, values) added to that layer's θ (a delta folded in)."""
    entries = entries or {}
    for module in list(model.modules()):
        for child_name, child in list(module.named_children()):
            if not scheme_of(child):
                continue
            weight = dequantize(child)
            if id(child) in entries:
                positions, values = entries[id(child)]
                weight.view(-1).index_add_(0, positions, values.to(weight.dtype))
            linear = nn.Linear(child.in_features, child.out_features, bias=child.bias is not None, device="meta")
            linear.weight = nn.Parameter(weight.to(dtype), requires_grad=False)
            if child.bias is not None:
                linear.bias = nn.Parameter(child.bias.detach().to(dtype).clone(), requires_grad=False)
            linear.train(child.training)
            setattr(module, child_name, linear)
    return model


def refuse_full_training(model: nn.Module, what: str = "full fine-tuning") -> None:
    """Raise a UsageError naming the fix when `model` holds quantized layers."""
    if is_quantized(model):
        raise UsageError(
            f"{what} needs float weights, and this base is quantized (bitsandbytes int8/4-bit layers cannot be "
            "trained); train a delta over it (e.g. --method sara), or load the base unquantized "
            "(drop --base-quantization)"
        )
