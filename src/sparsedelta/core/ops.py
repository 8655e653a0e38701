"""Autograd functions that give the gradient of a sparse delta's values directly.

Every function here takes the frozen, already-merged weight (θ + delta) as a plain input and the
delta's `values` as the only differentiable weight-side input. Backward returns the input gradient
as usual and the k-vector ∂L/∂values; no `.grad` is ever kept for the frozen weight. A linear
layer's k entries come from a sampled product (only the k dot products) on CPU at low density,
otherwise from a transient dense per-layer product that is gathered at once and freed.

Under autocast the forward runs in the autocast dtype; backward casts explicitly to the output
gradient's dtype instead of relying on the autocast state, and returns each gradient in its
input's own dtype.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch.autograd import Function

# ∂L/∂W = gᵀx is needed at k positions only. A sampled product over the delta's CSR pattern does
# N·k multiply-adds but needs gᵀ and xᵀ as contiguous copies (N·(in + out) moves). Measured on a
# 2-core CPU at MiniLM's shapes, N = 4096 tokens: 0.30 × the dense product + gather at 0.1%
# density, 0.45 × at 3%, 0.71 × at 10%, ~1.1 × at 20% (the crossover hardly depends on N, both
# costs grow with it). On CUDA the dense product stays: cuBLAS, and the sampled kernel is unmeasured.
SAMPLED_MAX_DENSITY = 0.1
SAMPLED_CHUNK = 512  # tokens per transposed copy
SAMPLED_DTYPES = (torch.float32, torch.float64)  # what torch.sparse.sampled_addmm takes on CPU


def sampled_pays(weight: torch.Tensor, k: int) -> bool:
    """Whether a linear layer's values gradient should come from the sampled product."""
    return (
        weight.device.type == "cpu"
        and weight.dtype in SAMPLED_DTYPES
        and k <= SAMPLED_MAX_DENSITY * weight.numel()
    )


def _gather(dense_grad: torch.Tensor, indices: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return dense_grad.reshape(-1).index_select(0, indices).to(dtype)


class LinearDelta(Function):
    """y = x Wᵀ + b (nn.Linear) or y = x W + b (transformers' Conv1D, `transposed=True`)."""

    @staticmethod
    def forward(ctx, x, weight, bias, values, indices, transposed, pattern=None):
        """`pattern`: the delta's positions as a CSR (crow, col) of the weight, to take the sampled
        product in backward; None for the dense product + gather."""
        ctx.save_for_backward(x, weight, indices)
        ctx.pattern = pattern
        ctx.weight_shape = weight.shape
        ctx.transposed = transposed
        ctx.values_dtype = values.dtype
        ctx.bias_dtype = bias.dtype if bias is not None else None
        return linear(x, weight if transposed else weight.t(), bias)

    @staticmethod
    def backward(ctx, grad_out):
        x, weight, indices = ctx.saved_tensors
        g = grad_out.reshape(-1, grad_out.shape[-1])
        w = weight if ctx.transposed else weight.t()  # (in, out)
        grad_x = grad_bias = grad_values = None
        if ctx.needs_input_grad[0]:
            grad_x = grad_out.matmul(w.to(g.dtype).t()).to(x.dtype)
        if ctx.bias_dtype is not None and ctx.needs_input_grad[2]:
            grad_bias = g.sum(0).to(ctx.bias_dtype)
        if ctx.needs_input_grad[3]:
            x2 = x.reshape(-1, x.shape[-1]).to(g.dtype)
            if ctx.pattern is not None and g.dtype in SAMPLED_DTYPES:  # autocast may bring bf16: dense
                grad_values = _sampled_weight_grad(g, x2, ctx.pattern, ctx.weight_shape, ctx.transposed)
                grad_values = grad_values.to(ctx.values_dtype)
            else:
                dense = x2.t().matmul(g) if ctx.transposed else g.t().matmul(x2)
                grad_values = _gather(dense, indices, ctx.values_dtype)
        return grad_x, None, grad_bias, grad_values, None, None, None


def _sampled_weight_grad(g, x, pattern, shape, transposed: bool) -> torch.Tensor:
    """(gᵀx or xᵀg) at the CSR pattern's positions, in the pattern's (= sorted flat index) order.
    The kernel wants its left factor row-major and its right factor column-major, so each chunk of
    tokens is transposed: in chunks, the copies stay small and in cache."""
    crow, col = pattern
    total = g.new_zeros(len(col))
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        mask = torch.sparse_csr_tensor(crow, col, g.new_zeros(len(col)), shape, check_invariants=False)
        for g_chunk, x_chunk in zip(g.split(SAMPLED_CHUNK), x.split(SAMPLED_CHUNK), strict=True):
            gt, xt = g_chunk.t().contiguous(), x_chunk.t().contiguous()  # (out, n), (in, n)
            left, right = (xt, gt) if transposed else (gt, xt)
            total += torch.sparse.sampled_addmm(mask, left, right.t(), beta=0.0).values()
    return total


class EmbeddingDelta(Function):
    """Embedding lookup whose values-gradient touches only the rows present in the batch."""

    @staticmethod
    def forward(ctx, ids, weight, values, indices, padding_idx):
        ctx.save_for_backward(ids, indices)
        ctx.num_rows, ctx.dim = weight.shape
        ctx.padding_idx = padding_idx
        ctx.values_dtype = values.dtype
        return F.embedding(ids, weight, padding_idx)

    @staticmethod
    def backward(ctx, grad_out):
        ids, indices = ctx.saved_tensors
        flat_ids = ids.reshape(-1)
        g = grad_out.reshape(-1, ctx.dim)
        if ctx.padding_idx is not None:  # as F.embedding: the padding row gets no gradient
            keep = flat_ids != ctx.padding_idx
            flat_ids, g = flat_ids[keep], g[keep]
        rows, inverse = torch.unique(flat_ids, return_inverse=True)
        row_grads = g.new_zeros(len(rows), ctx.dim).index_add_(0, inverse, g)
        slot = torch.full((ctx.num_rows,), -1, dtype=torch.long, device=ids.device)
        slot[rows] = torch.arange(len(rows), device=ids.device)
        sel_slot = slot[indices // ctx.dim]
        hit = sel_slot >= 0
        grad_values = torch.zeros(len(indices), dtype=ctx.values_dtype, device=g.device)
        grad_values[hit] = row_grads[sel_slot[hit], indices[hit] % ctx.dim].to(ctx.values_dtype)
        return None, None, grad_values, None, None


class AddDelta(Function):
    """Generic path: returns the merged weight itself (a view, no copy) so any module can use it;
    backward gathers the k entries of the dense weight gradient that autograd computed."""

    @staticmethod
    def forward(ctx, weight, values, indices):
        ctx.save_for_backward(indices)
        ctx.values_dtype = values.dtype
        return weight.view_as(weight)

    @staticmethod
    def backward(ctx, grad):
        (indices,) = ctx.saved_tensors
        return None, _gather(grad, indices, ctx.values_dtype), None


def linear(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x w + b with w of shape (in, out): F.linear's fused kernel, and its autocast dtype when autocast is on."""
    return F.linear(x, w.t(), bias)
