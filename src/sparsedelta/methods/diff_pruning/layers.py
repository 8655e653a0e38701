"""Phase 1's forward: each targeted module computes θ + δ per call (a temporary) and its backward
recomputes the mask; linear layers and embeddings take fast paths (the core's type table)."""

from __future__ import annotations

import torch
from torch import nn
from torch.autograd import Function

from ...core import patching
from ...core.ops import linear


# -- gradient paths: θ + δ per layer, recomputed in backward --------------------------------------------
class DiffWeight(Function):
    """Any parameter: returns θ + δ (a temporary); backward gives ∂L/∂w, ∂L/∂α through δ."""

    @staticmethod
    def forward(ctx, weight, diff, step, keep, *leaves):
        ctx.diff, ctx.step = diff, step
        ctx.save_for_backward(*leaves)
        return diff.merged(weight, step, leaves, keep)

    @staticmethod
    def backward(ctx, grad):
        needs = ctx.needs_input_grad[4:]
        grads, _ = ctx.diff.backward(ctx.step, ctx.saved_tensors, needs, grad)
        return None, None, None, None, *grads


class DiffLinear(Function):
    """y = x (θ + δ)ᵀ + b (nn.Linear) or x (θ + δ) + b (transformers' Conv1D, transposed=True).
    Only x is kept for backward; θ + δ is recomputed there instead of held across the step."""

    @staticmethod
    def forward(ctx, x, weight, bias, diff, step, keep, transposed, *leaves):
        ctx.diff, ctx.step, ctx.transposed = diff, step, transposed
        ctx.bias_dtype = bias.dtype if bias is not None else None
        ctx.save_for_backward(x, weight, *leaves)
        merged = diff.merged(weight, step, leaves, keep)
        return linear(x, merged if transposed else merged.t(), bias)

    @staticmethod
    def backward(ctx, grad_out):
        x, weight, *leaves = ctx.saved_tensors
        needs = ctx.needs_input_grad[7:]
        g = grad_out.reshape(-1, grad_out.shape[-1])
        x2 = x.reshape(-1, x.shape[-1]).to(g.dtype)
        dense = x2.t().matmul(g) if ctx.transposed else g.t().matmul(x2)  # ∂L/∂(θ + δ), this layer only
        leaf_grads, merged = ctx.diff.backward(ctx.step, leaves, needs, dense, weight)
        del dense
        grad_x = grad_bias = None
        if ctx.needs_input_grad[0]:
            w = merged if ctx.transposed else merged.t()  # (in, out)
            grad_x = grad_out.matmul(w.to(g.dtype).t()).to(x.dtype)
        if ctx.bias_dtype is not None and ctx.needs_input_grad[2]:
            grad_bias = g.sum(0).to(ctx.bias_dtype)
        return grad_x, None, grad_bias, None, None, None, None, *leaf_grads


class DiffEmbedding(Function):
    """nn.Embedding lookup of θ + δ that computes the mask of the looked-up rows only."""

    @staticmethod
    def forward(ctx, ids, weight, padding_idx, diff, step, *leaves):
        rows, inverse = torch.unique(ids, return_inverse=True)
        ctx.diff, ctx.step, ctx.padding_idx = diff, step, padding_idx
        ctx.save_for_backward(rows, inverse, *leaves)
        return nn.functional.embedding(inverse, diff.merged_rows(weight, step, rows, leaves))

    @staticmethod
    def backward(ctx, grad_out):
        rows, inverse, *leaves = ctx.saved_tensors
        width = grad_out.shape[-1]
        row_grads = grad_out.new_zeros(len(rows), width).index_add_(0, inverse.reshape(-1), grad_out.reshape(-1, width))
        if ctx.padding_idx is not None:  # as F.embedding: the padding row gets no gradient
            row_grads[rows == ctx.padding_idx] = 0
        grads = ctx.diff.backward_rows(ctx.step, rows, leaves, ctx.needs_input_grad[5:], row_grads)
        return None, None, None, None, None, *grads




LAYER_KEY = "diff-pruning"


class PhaseOneLayer:
    """A module's patching layer in phase 1: its targeted parameters become θ + δ for the call."""

    __slots__ = ("bindings",)

    def __init__(self):
        self.bindings: list[tuple[str, object]] = []  # (parameter name, DiffVector)

    def __call__(self, module: nn.Module, inner, *args, **kwargs):
        sampled = module.training
        keep = sampled and torch.is_grad_enabled()  # this forward's noise is kept for its backward
        path = patching.fast_path(module) if inner.plain else None
        if path is not None and path.kind not in ("linear", "embedding"):
            path = None  # phase 1 has no conv kernel of its own: the generic path is exact
        swapped, fast = [], None
        try:
            for pname, diff in self.bindings:
                step = diff.advance() if sampled else None
                if pname == "weight" and path is not None:
                    fast = (diff, step)
                    continue
                original = module._parameters[pname]
                module._parameters[pname] = DiffWeight.apply(original, diff, step, keep, *diff.leaves())
                swapped.append((pname, original))
            if fast is None:
                return inner(*args, **kwargs)
            diff, step = fast
            x = args[0] if args else next(iter(kwargs.values()))
            if path.kind == "embedding":
                return DiffEmbedding.apply(x, module.weight, module.padding_idx, diff, step, *diff.leaves())
            return DiffLinear.apply(x, module.weight, module.bias, diff, step, keep, path.transposed, *diff.leaves())
        finally:
            for pname, original in swapped:
                module._parameters[pname] = original


def bind(module: nn.Module, pname: str, diff) -> None:
    """Route parameter `pname` of `module` through `diff` in phase 1."""
    layer = patching.layer_of(module, LAYER_KEY)
    if layer is None:
        layer = PhaseOneLayer()
        patching.wrap(module, LAYER_KEY, layer)
    layer.bindings.append((pname, diff))
