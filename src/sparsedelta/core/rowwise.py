"""One task's correction to its own rows of a module's output, computed from the delta's k entries.

With the base weight θ in place, a module's output for the rows of task t differs from that of the
task's merged model by what the delta Δ_t adds; these functions add exactly that to those rows:

    linear  (nn.Linear, W of shape (out, in); transformers' Conv1D, W of shape (in, out))
            y_rows += x_rows Δᵀ: a sparse (CSR) product with the k entries, N·k multiply-adds for N tokens
    bias    y_rows[..., j] += Δb_j for the delta's positions j
    embedding  y_rows[token, j] += Δ[id(token), j]: each token's entries found through the delta's
            CSR row pointers, so only the entries of the ids present are touched
    merged_tensor  θ with the task's entries written in: the generic path's transient copy of one
            tensor (norms, conv kernels, ...), see mixed.py

Δ here is the *effective* delta, merged value minus θ in the weight's dtype, so the sum matches
what the merged weight computes (float64 to rounding). The prepared forms (a CSR matrix, row
pointers) are cached per delta until its values or positions change: about 8 extra bytes per entry.
"""

from __future__ import annotations

import warnings
import weakref

import torch

from .delta import SparseDelta

_CACHE: weakref.WeakKeyDictionary[SparseDelta, tuple[tuple, object]] = weakref.WeakKeyDictionary()
HALF = (torch.float16, torch.bfloat16)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Corrections of float16/bfloat16 layers are computed in float32 (CPU sparse kernels lack them)."""
    return torch.float32 if dtype in HALF else dtype


def _merged_entries(delta: SparseDelta, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(positions, θ there, θ + Δ there in the weight's dtype), trained and frozen entries, as
    `SparseDelta.merge` writes them."""
    positions, base, values = delta.all_entries()
    merged = (base.to(values.dtype) + values).to(weight.dtype)
    return positions, base.to(weight.dtype), merged


def _prepared(delta: SparseDelta, weight: torch.Tensor, kind: str, build):
    values, indices = delta.values, delta.indices
    key = (kind, values.data_ptr(), values._version, indices.data_ptr(), indices._version,
           delta.frozen_indices.numel(), weight.dtype, weight.device)  # fmt: skip
    cached = _CACHE.get(delta)
    if cached is not None and cached[0] == key:
        return cached[1]
    positions, base, merged = _merged_entries(delta, weight)
    dtype = compute_dtype(weight.dtype)
    effective = merged.to(dtype) - base.to(dtype)
    prepared = build(positions, effective)
    _CACHE[delta] = (key, prepared)
    return prepared


def _csr(crow: torch.Tensor, col: torch.Tensor, values: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        return torch.sparse_csr_tensor(crow, col, values, shape, check_invariants=False)


def _row_pointers(rows: torch.Tensor, num_rows: int) -> torch.Tensor:
    index_dtype = torch.int32 if len(rows) < 2**31 and num_rows < 2**31 else torch.long
    crow = torch.zeros(num_rows + 1, dtype=torch.long, device=rows.device)
    crow[1:] = torch.bincount(rows, minlength=num_rows).cumsum(0)
    return crow.to(index_dtype)


def linear_matrix(delta: SparseDelta, weight: torch.Tensor, transposed: bool) -> torch.Tensor:
    """The effective Δ as a CSR matrix of shape (out, in), for W (out, in), or for W (in, out) when
    `transposed` (Conv1D)."""

    def build(positions, effective):
        if transposed:  # W is (in, out): position = i·out + o
            n_in, n_out = weight.shape
            rows, cols = positions % n_out, positions // n_out
            order = torch.argsort(rows * n_in + cols)
            rows, cols, effective = rows[order], cols[order], effective[order]
        else:  # positions are already sorted row-major
            n_out, n_in = weight.shape
            rows, cols = positions // n_in, positions % n_in
        crow = _row_pointers(rows, n_out)
        return _csr(crow, cols.to(crow.dtype), effective, (n_out, n_in))

    return _prepared(delta, weight, "linear", build)


def transposed_rows(x: torch.Tensor, rows: slice | torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The tokens of x[rows] as the columns of a contiguous (in, tokens) matrix: the right operand of
    the sparse product (its kernel wants Δ on the left). (Gathering scattered rows through a transposed
    view, `index_select` on dim 1, was 10 × slower here: it copies the whole input.)"""
    return x[rows].reshape(-1, x.shape[-1]).t().to(dtype).contiguous()


def add_linear(matrix: torch.Tensor, x_t: torch.Tensor, y: torch.Tensor, rows: slice | torch.Tensor) -> None:
    """y[rows] += x[rows] Δᵀ in place, from x[rows]'s tokens as columns (`transposed_rows`); y is (n, ..., out)."""
    correction = torch.sparse.mm(matrix, x_t).t().to(y.dtype)  # (tokens, out), a transposed view
    part = y[rows]  # a view for a slice; a gathered copy, written back, for scattered rows
    part.add_(correction.reshape(part.shape))
    if not isinstance(rows, slice):
        y[rows] = part


def bias_entries(delta: SparseDelta, bias: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return _prepared(delta, bias, "bias", lambda positions, effective: (positions, effective))


def add_bias(entries: tuple[torch.Tensor, torch.Tensor], y: torch.Tensor) -> None:
    """y[..., j] += Δb_j at the delta's positions (distinct, so no accumulation is needed)."""
    positions, effective = entries
    y[..., positions] += effective.to(y.dtype)


def embedding_rows(delta: SparseDelta, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(row pointers over the table's rows, column of each entry, effective values)."""

    def build(positions, effective):
        num_rows, dim = weight.shape
        return _row_pointers(positions // dim, num_rows).long(), positions % dim, effective

    return _prepared(delta, weight, "embedding", build)


def add_embedding(rows: tuple[torch.Tensor, torch.Tensor, torch.Tensor], ids: torch.Tensor, y: torch.Tensor) -> None:
    """y[token, j] += Δ[ids[token], j] for every entry of the looked-up rows; y is (*ids.shape, dim)."""
    crow, cols, effective = rows
    flat_ids = ids.reshape(-1).long()
    start = crow[flat_ids]
    count = crow[flat_ids + 1] - start
    total = int(count.sum())
    if total == 0:
        return
    token = torch.repeat_interleave(torch.arange(len(flat_ids), device=ids.device), count)
    first = torch.repeat_interleave(start - (count.cumsum(0) - count), count)  # entry = first + running index
    entry = first + torch.arange(total, device=ids.device)
    flat = y.view(-1, y.shape[-1])
    flat.index_put_((token, cols[entry]), effective[entry].to(y.dtype), accumulate=True)


def merged_tensor(delta: SparseDelta, param: torch.Tensor) -> torch.Tensor:
    """θ with the task's entries written in (a transient copy of this one tensor)."""
    positions, _, merged = _merged_entries(delta, param)
    out = param.detach().clone()
    out.view(-1).put_(positions, merged)
    return out
