"""One task's correction to its own rows of a module's output, computed from the delta's k entries.

With the base weight θ in place, a module's output for the rows of task t differs from that of the
task's merged model by what the delta Δ_t adds; these functions add exactly that to those rows:

    table   (nn.Linear, W of shape (out, in); transformers' Conv1D, W of shape (in, out)): every
            task's entries of one weight in a padded table (12 bytes per entry), from which
            y[t] += x[t] Δ_{task(t)}ᵀ for the tokens of every task at once (each token gathers its
            inputs at its task's entries: few tokens per task, decoding), or a task's row of it as
            a CSR matrix, y_rows += x_rows Δᵀ, N·k multiply-adds for N tokens
    bias    y_rows[..., j] += Δb_j for the delta's positions j
    embedding  y_rows[token, j] += Δ[id(token), j]: each token's entries found through the delta's
            CSR row pointers, so only the entries of the ids present are touched
    merged_tensor  θ with the task's entries written in: the generic path's transient copy of one
            tensor (norms, conv kernels, ...), see mixed.py

Δ here is the *effective* delta, merged value minus θ in the weight's dtype, so the sum matches
what the merged weight computes (float64 to rounding). The other prepared forms (biases' entries,
an embedding's row pointers, the merged entries a rerun writes) are cached per delta until its
values or positions change.
"""

from __future__ import annotations

import warnings
import weakref

import torch

from .delta import SparseDelta

# per delta, per kind of prepared form: (the delta's state it was built from, the form); a generation
# alternates the forms (a prompt's rows run again merged, single tokens take the sparse correction)
_CACHE: weakref.WeakKeyDictionary[SparseDelta, dict[str, tuple[tuple, object]]] = weakref.WeakKeyDictionary()
HALF = (torch.float16, torch.bfloat16)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Corrections of float16/bfloat16 layers are computed in float32 (CPU sparse kernels lack them)."""
    return torch.float32 if dtype in HALF else dtype


def _merged_entries(delta: SparseDelta, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(positions, θ there, θ + Δ there in the weight's dtype), trained and frozen entries, as
    `SparseDelta.merge` writes them."""
    positions, base, values = delta.all_entries()
    if delta.quantized:  # θ is never written: the effective delta is the values themselves, exactly
        return positions, torch.zeros_like(values, dtype=weight.dtype), values.to(weight.dtype)
    merged = (base.to(values.dtype) + values).to(weight.dtype)
    return positions, base.to(weight.dtype), merged


def _prepared(delta: SparseDelta, weight: torch.Tensor, kind: str, build):
    values, indices = delta.values, delta.indices
    key = (values.data_ptr(), values._version, indices.data_ptr(), indices._version,
           delta.frozen_indices.numel(), weight.dtype, weight.device)  # fmt: skip
    forms = _CACHE.setdefault(delta, {})
    cached = forms.get(kind)
    if cached is not None and cached[0] == key:
        return cached[1]
    positions, base, merged = _merged_entries(delta, weight)
    dtype = compute_dtype(weight.dtype)
    effective = merged.to(dtype) - base.to(dtype)
    prepared = build(positions, effective)
    forms[kind] = (key, prepared)
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


def take(x: torch.Tensor, rows: slice | torch.Tensor) -> torch.Tensor:
    """x[rows]: a view for a slice, else `index_select` (advanced indexing, x[index], was 7 × slower here)."""
    return x[rows] if isinstance(rows, slice) else x.index_select(0, rows)


def put(y: torch.Tensor, rows: slice | torch.Tensor, part: torch.Tensor) -> None:
    """y[rows] = part (`index_copy_` for an index: y[index] = part was 15 × slower here)."""
    if isinstance(rows, slice):
        y[rows] = part
    else:
        y.index_copy_(0, rows, part)


TOKEN_BLOCK = 128  # tokens per sparse product: its (out, tokens) result stays in cache (3.5 × faster at 2,048 tokens here)


def transposed_rows(x: torch.Tensor, rows: slice | torch.Tensor, dtype: torch.dtype) -> list[torch.Tensor]:
    """The tokens of x[rows] as the columns of contiguous (in, ≤ TOKEN_BLOCK) matrices, in order: the
    right operands of the sparse product (its kernel wants Δ on the left). (Gathering scattered rows
    through a transposed view, `index_select` on dim 1, was 10 × slower here: it copies the whole input.)"""
    tokens = take(x, rows).reshape(-1, x.shape[-1])
    return [tokens[s : s + TOKEN_BLOCK].t().to(dtype).contiguous() for s in range(0, tokens.shape[0], TOKEN_BLOCK)]


def add_linear(matrix: torch.Tensor, blocks: list[torch.Tensor], y: torch.Tensor, rows: slice | torch.Tensor) -> None:
    """y[rows] += x[rows] Δᵀ in place, from x[rows]'s tokens in column blocks (`transposed_rows`); y is (n, ..., out)."""
    part = y[rows] if isinstance(rows, slice) else None
    in_place = part is not None and part.is_contiguous()
    tokens = sum(block.shape[1] for block in blocks)
    flat = part.view(-1, y.shape[-1]) if in_place else y.new_zeros(tokens, y.shape[-1])
    start = 0
    for block in blocks:
        correction = torch.sparse.mm(matrix, block).t().to(y.dtype)  # (tokens, out), a transposed view
        flat[start : start + correction.shape[0]].add_(correction)
        start += correction.shape[0]
    if in_place:
        return
    if part is not None:
        part.add_(flat.view(part.shape))
    else:  # scattered rows: added in place, no gather and write-back
        y.index_add_(0, rows, flat.view(len(rows), *y.shape[1:]))


def linear_table(deltas: list[SparseDelta | None], weight: torch.Tensor, transposed: bool) -> tuple:
    """Every task's effective Δ of one linear weight as rows of a padded table: (outputs, inputs,
    values, (entries per row, CSR row pointers per row)), the first three (len(deltas) + 1, k_max),
    indices int32 (12 bytes per entry). Row i holds deltas[i]'s entries ordered by (output, input), as a CSR matrix wants them
    (`table_matrix`), then zeros; a None and the last row are all zeros (the bare base, tasks
    without a delta here). For W (out, in), or W (in, out) when `transposed` (Conv1D)."""
    width = weight.shape[1]
    dtype = compute_dtype(weight.dtype)
    parts = []
    for delta in deltas:
        if delta is None:
            parts.append(None)
            continue
        positions, base, merged = _merged_entries(delta, weight)
        major, minor = positions // width, positions % width
        outs, ins = (minor, major) if transposed else (major, minor)
        effective = merged.to(dtype) - base.to(dtype)
        if transposed or delta.frozen_indices.numel():  # positions sorted by input, or frozen ones appended
            order = torch.argsort(outs * weight.shape[0 if transposed else 1] + ins)
            outs, ins, effective = outs[order], ins[order], effective[order]
        parts.append((outs, ins, effective))
    k_max = max((len(p[0]) for p in parts if p is not None), default=0)
    outs = torch.zeros(len(deltas) + 1, k_max, dtype=torch.int32, device=weight.device)
    ins = torch.zeros_like(outs)
    values = torch.zeros(len(deltas) + 1, k_max, dtype=dtype, device=weight.device)
    counts = [0] * (len(deltas) + 1)
    n_out = weight.shape[1 if transposed else 0]
    pointers = torch.zeros(len(deltas) + 1, n_out + 1, dtype=torch.int32, device=weight.device)
    for row, part in enumerate(parts):
        if part is not None:
            k = counts[row] = len(part[0])
            outs[row, :k], ins[row, :k], values[row, :k] = part
            pointers[row] = _row_pointers(part[0], n_out).to(torch.int32)
    return outs, ins, values, (counts, pointers)


def table_matrix(table: tuple, row: int, n_in: int) -> torch.Tensor:
    """Row `row` of a `linear_table` as a CSR matrix of shape (out, in): views of the table's
    column indices, values and row pointers (4 bytes per output per task), no copy."""
    _, ins, values, (counts, pointers) = table
    k = counts[row]
    return _csr(pointers[row], ins[row, :k], values[row, :k], (pointers.shape[1] - 1, n_in))


def add_table(table: tuple[torch.Tensor, ...], codes: torch.Tensor, tokens: torch.Tensor | None, x: torch.Tensor,
              y: torch.Tensor) -> None:  # fmt: skip
    """y[t] += x[t] Δᵀ of the table's row codes[i] for each token t = tokens[i] of x (..., in) and y
    (..., out) (tokens None: every token, in order), in place: one gather, one product and one scatter
    for every task of the batch, whatever their number. Summed in the table's dtype (float32 for
    half-precision layers) before it is added to y, as the merged weight's product would be."""
    outs, ins, values, _ = table
    x2 = x.reshape(-1, x.shape[-1])
    if tokens is not None:
        x2 = x2.index_select(0, tokens)
    gathered = x2.gather(1, ins.index_select(0, codes).long()).to(values.dtype) * values.index_select(0, codes)
    targets = outs.index_select(0, codes).long()
    if tokens is None and y.dtype == values.dtype and y.is_contiguous():
        y.view(-1, y.shape[-1]).scatter_add_(1, targets, gathered)
        return
    total = gathered.new_zeros(x2.shape[0], y.shape[-1]).scatter_add_(1, targets, gathered).to(y.dtype)
    if tokens is None:
        y += total.view(y.shape)
    elif y.is_contiguous():
        y.view(-1, y.shape[-1]).index_add_(0, tokens, total)
    else:
        y += y.new_zeros(y.shape).view(-1, y.shape[-1]).index_add_(0, tokens, total).view(y.shape)


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


def merged_entries(delta: SparseDelta, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(positions, θ + Δ there in the weight's dtype): what the task's merged weight holds there."""

    def build(positions, effective):
        positions, _, merged = _merged_entries(delta, weight)
        return positions, merged

    return _prepared(delta, weight, "merged", build)


def merged_tensor(delta: SparseDelta, param: torch.Tensor) -> torch.Tensor:
    """θ with the task's entries written in (a transient copy of this one tensor)."""
    positions, _, merged = _merged_entries(delta, param)
    out = param.detach().clone()
    out.view(-1).put_(positions, merged)
    return out
