"""Mixed-task batches: each row of a batch runs with its own task's delta, in one forward pass.

    model(**batch, adapter_names=["news", "__base__", "sport", ...])   # PEFT's convention, one name per row
    model.generate(input_ids, adapter_names=[...])                      # generation, each row with its task
    with sparsedelta.mixed_batch(model, names): model(**batch)          # for any forward (no extra kwargs)

The base model runs once, unmerged, for the whole batch (switching every delta off costs O(k)), and
each module that holds a delta adds, for each task in the batch, that task's correction to that
task's rows only (rowwise.py). No weight is copied per task. Per kind of tensor:

- `nn.Linear` and transformers' `Conv1D` weights: when every task's rows hold few tokens (up to
  TABLE_AT each: decoding), y += x Δᵀ for all of them at once: each layer keeps every task's entries
  in one padded table (12 bytes per entry), and each token gathers its inputs, scales them by its
  task's values and adds them into its outputs (one gather, one product, one scatter per layer,
  whatever the number of tasks); otherwise a task's rows take a sparse product over its k entries,
  or, for rows of many tokens (tokens × density ≥ RERUN_AT), run the layer again with θ + Δ written
  into the weight in place and restored after (O(k) writes; CPU sparse kernels are slow enough that
  this is cheaper from ~25 tokens at 1%), and the base output is not computed at all when every row
  runs so. Biases: y_rows[..., j] += Δb_j; `nn.Embedding` weights: the entries of the looked-up rows
  are added. These are the fast paths of `patching.FAST_PATHS`.
- `nn.Conv1d/2d/3d` kernels (the "conv" fast path): the layer runs again on the task's rows with
  θ + Δ written into its kernel in place and restored after (O(k) writes, no copy): one more
  convolution per task present.
- Any other tensor (norms, convs that pad other than with zeros, embeddings that renormalise, a
  module with a forward of its own): the module runs again on the task's rows with θ + Δ in place
  of that tensor, a transient copy freed after the call. Exact, and cheap for norms and biases.
- Densely saved modules (`modules_to_save`, e.g. a classifier head): the module runs once per
  distinct head on the rows that use it ("__base__" rows and tasks without a head of their own use
  the base's). Tasks whose heads differ in shape (other label counts) cannot share a batch, since
  their outputs cannot be stacked: refused, naming the tensor; `sparsedelta predict` groups its
  tasks by head. (One model cannot even hold two heads of different shapes: `load` refuses it.)

Rows: a module's first input has the batch as its first dimension, or a multiple of it (the batch
flattened with the tokens, B·T, or repeated for beam search / num_return_sequences, as
`generate` does with repeat_interleave): element i then belongs to the row i // r. A first
dimension of 1 that broadcasts over the batch (e.g. position embeddings) is expanded to the batch.
An input of 3+ dimensions whose first is m·B (m > 1) may as well be sequence-first, (T, B, ...)
with T = m·B, which row-splitting would route by the wrong axis: it is refused unless the rows are
known to be repeated m times, by the caller (`mixed_batch(..., repeats=m)`) or because `generate`
gave the model itself m·B rows. (T = B cannot be told from (B, T): batch-first is required.)

Threads: one model runs one forward at a time. A mixed batch unmerges every delta and writes tasks'
entries into the shared weights for its duration, so its `mixed_batch` block (and a `generate` with
adapter_names) holds the model's lock, and every forward of a model with deltas takes the same lock
in its pre-hook: a plain forward on another thread waits for the batch, then runs on the merged
model. The lock is re-entrant (forwards inside a batch, generate's steps) and kept beside the model,
not on it, so copies and pickles carry none. Calls into a submodule directly are not serialised.

What a batch needs is kept between batches (a server opens one at every decoding step): the
model's layers with each adapter's deltas (until an adapter is added or deleted), each layer's plan
for the batch's rows and input shape, and its table (until a delta of the batch changes, which is
checked at each forward of the model).

Inference only: refused in training mode, and no gradient flows through the corrections (train one
task at a time with `set_adapter`). How `adapter_names` reaches the layers: a forward pre-hook on the
model (installed when its first delta is attached) takes the argument out and opens a mixed batch
for that call; every module involved gets a patching layer under the key "mixed" for its duration.
"""

from __future__ import annotations

import contextlib
import functools
import math
import threading
import weakref
from collections.abc import Sequence

import torch
from torch import nn

from ..errors import UsageError
from . import patching, quantized, rowwise
from .adapters import LAYER_KEY as DELTA_KEY
from .adapters import MODEL_HOOKS, DeltaState, all_unmerged, disabled, set_adapter, state_of
from .delta import SparseDelta

BASE = "__base__"  # the name of a row that runs on the bare base model (PEFT's)
ADAPTER_NAMES = "adapter_names"
LAYER_KEY = "mixed"
_OPEN = "_sparsedelta_mixed"  # model attribute: the Routing of the batch being run
_CALL = "_sparsedelta_mixed_call"  # model attribute: the mixed batch a forward call opened


_LOCKS: weakref.WeakKeyDictionary[nn.Module, tuple[threading.RLock, threading.local]] = weakref.WeakKeyDictionary()
_LOCKS_GUARD = threading.Lock()


def _lock(model: nn.Module) -> tuple[threading.RLock, threading.local]:
    """The model's re-entrant lock and, per thread, the forwards that hold it."""
    entry = _LOCKS.get(model)  # every forward asks: the guard only for a model's first
    if entry is None:
        with _LOCKS_GUARD:
            entry = _LOCKS.setdefault(model, (threading.RLock(), threading.local()))
    return entry


class Routing:
    """Which rows of a module's input belong to which task, for every size the batch takes inside
    the model (rows, rows × tokens, rows × beams): cached per (size, device)."""

    def __init__(self, names: list[str], repeats: int | None = None):
        self.names = names
        self.repeats = {repeats} if repeats else set()  # rows known repeated m times: the caller's m
        self.generated: set[int] = set()  # and generate's, seen in the model's input at each forward
        self.key = tuple(names)  # what a layer's memo of its work for this batch is keyed by
        self.tasks = list(dict.fromkeys(names))
        self._codes = torch.tensor([self.tasks.index(n) for n in names])
        self.layers: list[MixedLayer] = []  # the layers serving this batch, and the tasks' rows in their tables
        self.table_rows: list[int] = []
        self.checked = False  # the tables were checked since the last forward (_drop_stale)
        self._groups: dict[tuple[int, torch.device], list[tuple[str, slice | torch.Tensor]]] = {}
        self._input: tuple[torch.Tensor, int] | None = None  # the last input transposed, and its version
        self._transposed: dict[tuple, torch.Tensor] = {}

    def transposed(self, x: torch.Tensor, task: str, rows, dtype: torch.dtype) -> torch.Tensor:
        """`rowwise.transposed_rows` of a task's rows, kept while the same input comes again: the
        query, key and value projections (and gate and up) read one input, transposed once."""
        if self._input is None or self._input[0] is not x or self._input[1] != x._version:
            self._input, self._transposed = (x, x._version), {}
        key = (task, x.shape[0], dtype)
        if key not in self._transposed:
            self._transposed[key] = rowwise.transposed_rows(x, rows, dtype)
        return self._transposed[key]

    def groups(self, n: int, device: torch.device, dims: int = 2, name: str = "a module of this model"):
        """(task, its rows) for a first dimension of size n (of `name`'s input of `dims` dimensions): a
        slice when the rows are contiguous, else an index tensor. None for n = 1 under several tasks
        (the caller broadcasts)."""
        rows = len(self.names)
        m = n // rows
        if dims >= 3 and m > 1 and n % rows == 0 and len(self.tasks) > 1 and m not in self.repeats and m not in self.generated:
            raise UsageError(
                f"{name} got an input of shape ({n}, ...) under a mixed batch of {rows} rows: its "
                f"first dimension looks like a sequence axis (T = {m} x {rows}), and sequence-first (T, B, ...) layouts "
                "cannot be routed by row; give the module batch-first input (batch_first=True, or transpose to "
                "(B, T, ...)), or run the tasks in separate batches. If the rows really are repeated "
                f"{m} times each (a beam search of your own), say so: sparsedelta.mixed_batch(model, names, repeats={m})"
            )
        key = (n, device)
        if key in self._groups:
            return self._groups[key]
        if len(self.tasks) == 1:
            groups = [(self.tasks[0], slice(None))]
        elif n == 1:
            return None
        elif n % rows:
            raise UsageError(
                f"{name} got an input with first dimension {n}, but the batch has {rows} rows "
                f"({ADAPTER_NAMES} has {rows} names): mixed-task batches need the batch as the first dimension "
                "(or a multiple of it); give one name per row"
            )
        else:
            codes = self._codes.repeat_interleave(n // rows)
            groups = []
            for code, task in enumerate(self.tasks):
                idx = torch.nonzero(codes == code).squeeze(1)
                first, last = int(idx[0]), int(idx[-1])
                groups.append((task, slice(first, last + 1) if last - first + 1 == len(idx) else idx.to(device)))
        self._groups[key] = groups
        return groups


def _update(y: torch.Tensor, rows: slice | torch.Tensor, fix) -> None:
    """Apply the in-place `fix` to y[rows] (a view where it can be, else a copy written back)."""
    part = rowwise.take(y, rows)
    if isinstance(rows, slice) and part.is_contiguous():
        fix(part)
        return
    part = part.contiguous()
    fix(part)
    rowwise.put(y, rows, part)


class MixedLayer:
    """A module's patching layer for mixed batches: the base output, then each task's correction for
    its rows (fast path), or the module run again on those rows with the task's tensors (generic path,
    and densely saved heads). Kept in the model's _Layout from batch to batch: `routing` and `heads`
    are the open batch's; what to do for a batch's rows and input shape is worked out once (`_work`),
    and linear weights keep every task's entries in one table (`rowwise.linear_table`)."""

    __slots__ = ("routing", "deltas", "heads", "name", "index", "weights", "_memo", "_table")

    def __init__(self, name: str, index: dict[str, int]):
        self.routing: Routing | None = None
        self.index = index  # task -> its row in the tables (the layout's order, shared by its layers)
        self.name = name  # the module's path, for messages
        self.deltas: dict[str, list[tuple[str, SparseDelta]]] = {}  # task -> (parameter name, delta)
        self.heads: dict[str, dict[str, torch.Tensor]] = {}  # task -> {parameter name: saved tensor}
        self.weights: list[SparseDelta | None] = []  # per task of the layout, its weight delta here
        self._memo: tuple | None = None  # (batch key, its work)
        self._table: tuple | None = None  # (weight dtype and device, stamps per row, the table, tensors held)

    def __call__(self, module: nn.Module, inner, *args, **kwargs):
        x, put = _first_input(args, kwargs, self.name)
        groups = self.routing.groups(x.shape[0], x.device, x.dim(), self.name)
        if groups is None:  # a size-1 first dimension broadcast over several tasks' rows: expand it
            x = x.expand(len(self.routing.names), *x.shape[1:])
            args, kwargs = put(x)
            groups = self.routing.groups(x.shape[0], x.device, x.dim(), self.name)
        if torch.is_grad_enabled() and x.requires_grad:
            raise RuntimeError(
                f"{self.name}: mixed-task batches compute no gradient; run them under torch.no_grad() "
                "(to train, switch tasks with sparsedelta.set_adapter)"
            )
        fast = patching.fast_path(module) if inner.plain_but(DELTA_KEY) else None
        fixes, reruns, rerun_rows, table = self._work(fast, x, groups)
        with torch.no_grad():
            y = None  # the base output, skipped when every row runs again with its task's tensors
            if self.heads:
                y = self._with_heads(module, inner, x, put, args, kwargs, groups)
            elif rerun_rows < x.shape[0]:
                y = inner(*args, **kwargs)
            if y is not None and not isinstance(y, torch.Tensor):
                raise TypeError(f"{self.name} returns {type(y).__name__}, not a tensor: mixed-task batches cannot split it by row")
            for _, rows, bound in reruns:
                out = _run_merged(module, bound, inner, put(rowwise.take(x, rows)), in_place=fast is not None)
                if y is None:
                    y = out.new_empty((x.shape[0], *out.shape[1:]))
                rowwise.put(y, rows, out)
            for task, rows, bound in fixes:
                for pname, delta in bound:
                    self._fast_fix(module, fast, pname, delta, x, y, task, rows)
            if table is not None:
                rowwise.add_table(self._linear_table(module, fast), *table, x, y)
        return y

    def _work(self, fast: patching.FastPath | None, x: torch.Tensor, groups) -> tuple:
        """(fixes, reruns, rows run again, table): which tasks' rows are corrected from their entries
        and which run again; the linear weight of tasks whose rows hold few tokens (decoding) comes
        from the layer's table: (each such token's row in the table, those tokens' positions in x
        or None for all of them). Worked out once per batch and input shape: a server opens a batch
        of the same rows at every step."""
        key = (self.routing.key, tuple(x.shape), x.device, fast)
        if self._memo is not None and self._memo[0] == key:
            return self._memo[1]
        fixes, reruns, tabled, others = [], [], [], False  # (task, rows, bound); tabled: (task, rows)
        for task, rows in groups:
            bound = self.deltas.get(task)
            if not bound:
                continue
            if fast is None or not all(_fast_ok(fast, p) for p, _ in bound) or _rerun_is_cheaper(fast, bound, x, rows):
                reruns.append((task, rows, bound))
                others = True
            elif fast.kind == "linear" and any(p == "weight" for p, _ in bound) and _few_tokens(x, rows):
                tabled.append((task, rows))
                rest = [(p, d) for p, d in bound if p != "weight"]
                if rest:
                    fixes.append((task, rows, rest))
            else:
                fixes.append((task, rows, bound))
                others = others or any(p == "weight" for p, _ in bound)
        table = None
        if tabled:
            per_token = x.numel() // max(1, x.shape[0] * x.shape[-1])
            codes = torch.full((x.shape[0],), len(self.index), dtype=torch.long)  # the last row: zeros
            for task, rows in tabled:
                codes[rows if isinstance(rows, slice) else rows.cpu()] = self.index[task]
            codes = codes.repeat_interleave(per_token)
            tokens = None  # every token: the rows of tasks without a delta here just add zeros
            if others:  # rows of tasks corrected otherwise are left out
                tokens = torch.cat([torch.arange(x.shape[0])[r] if isinstance(r, slice) else r.cpu() for _, r in tabled]).sort().values
                tokens = (tokens[:, None] * per_token + torch.arange(per_token)).reshape(-1)
                codes = codes[tokens]
                tokens = tokens.to(x.device)
            table = (codes.to(x.device), tokens)
        rerun_rows = sum(_count(rows, x.shape[0]) for _, rows, _ in reruns)
        work = (fixes, reruns, rerun_rows, table)
        self._memo = (key, work)
        return work

    def _linear_table(self, module: nn.Module, fast: patching.FastPath) -> tuple:
        """Every task's weight entries of this layer in one table (kept until `drop_stale` finds a
        delta of the batch changed, or the weight's dtype changes)."""
        weight = _weight(module, fast)
        if self._table is None or self._table[0] != (weight.dtype, weight.device):
            stamps = [_stamp(d) for d in self.weights]
            held = [(d.values, d.indices) for d in self.weights if d is not None]  # ids in the stamps stay theirs
            self._table = ((weight.dtype, weight.device), stamps, rowwise.linear_table(self.weights, weight, fast.transposed), held)
        return self._table[2]

    def drop_stale(self, rows: list[int]) -> None:
        """Forget the table if the delta of one of these rows changed since it was built (values
        trained or written in place, positions re-selected, entries frozen): checked when a batch
        opens and at every forward of the model, in one pass over its layers (about 0.6 µs a delta)."""
        if self._table is not None and any(self._table[1][i] != _stamp(self.weights[i]) for i in rows):
            self._table = None

    def _fast_fix(self, module, fast: patching.FastPath, pname: str, delta: SparseDelta, x, y, task: str, rows) -> None:
        """One task's correction of its rows, from the delta's entries (rowwise.py)."""
        param = _weight(module, fast) if pname == "weight" else module._parameters[pname]
        if pname == "bias":
            entries = rowwise.bias_entries(delta, param)
            _update(y, rows, lambda part: rowwise.add_bias(entries, part))
        elif fast.kind == "embedding":
            table = rowwise.embedding_rows(delta, param)
            _update(y, rows, lambda part: rowwise.add_embedding(table, rowwise.take(x, rows), part))
        else:  # the task's row of the table as a CSR matrix: no form of its own kept per delta
            matrix = rowwise.table_matrix(self._linear_table(module, fast), self.index[task], param.shape[0 if fast.transposed else 1])
            rowwise.add_linear(matrix, self.routing.transposed(x, task, rows, matrix.dtype), y, rows)

    def _with_heads(self, module, inner, x, put, args, kwargs, groups):
        """The module once per distinct head, on the rows that use it."""
        by_head: dict[tuple[int, ...], tuple[dict, list]] = {}
        for task, rows in groups:
            tensors = self.heads[task]
            key = tuple(id(t) for t in tensors.values())
            by_head.setdefault(key, (tensors, []))[1].append(rows)
        if len(by_head) == 1:
            tensors, _ = next(iter(by_head.values()))
            return _run_with(module, tensors, inner, (args, kwargs))
        y = None
        for tensors, parts in by_head.values():
            rows = _join(parts, x.shape[0], x.device)
            out = _run_with(module, tensors, inner, put(rowwise.take(x, rows)))
            if y is None:
                y = out.new_empty((x.shape[0], *out.shape[1:]))
            rowwise.put(y, rows, out)
        return y


def _weight(module: nn.Module, fast: patching.FastPath) -> torch.Tensor:
    """The module's weight, or for a quantized one a float32 stand-in of its shape (its corrections
    need only that: they add the delta's entries, read from the delta)."""
    weight = module._parameters["weight"]
    return quantized.stand_in(weight) if fast.quantized else weight


def _first_input(args: tuple, kwargs: dict, name: str):
    """(the module's first input, a function giving (args, kwargs) with it replaced)."""
    if args:
        x = args[0]
        put = lambda new: ((new, *args[1:]), kwargs)  # noqa: E731
    elif kwargs:
        key, x = next(iter(kwargs.items()))
        put = lambda new: (args, {**kwargs, key: new})  # noqa: E731
    else:
        raise TypeError(f"{name} was called without an input: mixed-task batches split its first input by row")
    if not isinstance(x, torch.Tensor) or x.dim() == 0:
        raise TypeError(f"{name}'s first input is not a batch tensor: mixed-task batches split it by row")
    return x, put


def _join(parts: list, n: int, device: torch.device) -> slice | torch.Tensor:
    if len(parts) == 1:
        return parts[0]
    index = torch.cat([torch.arange(n)[p] if isinstance(p, slice) else p.cpu() for p in parts]).sort().values
    return index.to(device)


def _fast_ok(fast: patching.FastPath, pname: str) -> bool:
    """Whether the task's correction comes from its entries; a conv kernel's rows run again instead
    (with its entries written in place: O(k), no copy)."""
    if fast.kind == "conv":
        return False
    return pname == "weight" or (pname == "bias" and fast.kind == "linear")


# A linear layer's rows of one task run again with θ + Δ written into the weight when that costs less
# than the sparse correction: N tokens × k entries against one pass over the weight (measured on
# MiniLM: the correction of 128 tokens at 1% took 3 × the write-and-restore of its 1% entries).
RERUN_AT = 0.25  # tokens × density at and above which the rows run again


def _count(rows: slice | torch.Tensor, n: int) -> int:
    return len(range(n)[rows]) if isinstance(rows, slice) else len(rows)


# A task's linear rows of up to TABLE_AT tokens are corrected from the layer's table, more by a sparse
# product of its own (measured on SmolLM2's projections at 0.5%, 16 tasks, caches flushed between
# layers as the weights do: per step, the table cost 3.7 ms per token, the products 10 ms per task
# and little per token; equal at 4 tokens per task, the table 2.5 × faster at one).
TABLE_AT = 4


def _stamp(delta: SparseDelta | None) -> tuple | None:
    """What a delta's table row was built from (the table holds these tensors, so no other takes their id)."""
    if delta is None:
        return None
    values, buffers = delta._parameters["values"], delta._buffers  # nn.Module's __getattr__ took 1 µs a name here
    indices = buffers["indices"]
    return id(values), values._version, id(indices), indices._version, buffers["frozen_indices"].numel()


def _few_tokens(x: torch.Tensor, rows) -> bool:
    return _count(rows, x.shape[0]) * (x.numel() // max(1, x.shape[0] * x.shape[-1])) <= TABLE_AT


def _rerun_is_cheaper(fast: patching.FastPath, bound, x: torch.Tensor, rows) -> bool:
    if fast.kind != "linear" or fast.quantized:  # a quantized weight cannot take θ + Δ written in
        return False
    weights = [(delta, math.prod(delta.shape)) for pname, delta in bound if pname == "weight"]
    if not weights:
        return False  # a bias alone: its correction is one add
    delta, numel = weights[0]
    tokens = _count(rows, x.shape[0]) * (x.numel() // max(1, x.shape[0] * x.shape[-1]))
    return tokens * delta.num_entries / numel >= RERUN_AT


def _run_merged(module: nn.Module, bound, inner, call: tuple[tuple, dict], in_place: bool):
    """inner on these rows with the task's θ + Δ: written into the module's tensors and restored after
    (`in_place`, contiguous tensors: O(k) writes, no copy), else transient copies in their place."""
    params = [(module._parameters[pname], delta) for pname, delta in bound]
    if not in_place or not all(p.is_contiguous() for p, _ in params):
        return _run_with(module, {pname: rowwise.merged_tensor(delta, module._parameters[pname]) for pname, delta in bound},
                         inner, call)  # fmt: skip
    written = []
    try:
        for param, delta in params:
            positions, merged = rowwise.merged_entries(delta, param)
            flat = param.detach().view(-1)
            written.append((flat, positions, flat[positions]))
            flat.put_(positions, merged)
        args, kwargs = call
        return inner(*args, **kwargs)
    finally:
        for flat, positions, original in reversed(written):
            flat.put_(positions, original)


def _run_with(module: nn.Module, tensors: dict[str, torch.Tensor], inner, call: tuple[tuple, dict]):
    """inner(*args, **kwargs) with these tensors in place of the module's parameters of those names."""
    args, kwargs = call
    originals = {pname: module._parameters[pname] for pname in tensors}
    try:
        module._parameters.update(tensors)
        return inner(*args, **kwargs)
    finally:
        module._parameters.update(originals)


# -- opening a mixed batch ---------------------------------------------------------------------------
def _check_names(state: DeltaState, adapter_names) -> list[str]:
    if isinstance(adapter_names, str) or not isinstance(adapter_names, Sequence):
        raise TypeError(f"{ADAPTER_NAMES} must be a list of adapter names, one per row; got {type(adapter_names).__name__}")
    names = list(adapter_names)
    if not names or not all(isinstance(n, str) for n in names):
        raise TypeError(f"{ADAPTER_NAMES} must hold one adapter name (a string, or '{BASE}') per row; got {names[:3]}")
    unknown = sorted({n for n in names if n != BASE and n not in state.adapters})
    if unknown:
        raise UsageError(
            f"unknown adapter(s) {unknown} in {ADAPTER_NAMES}; this model has {sorted(state.adapters)} "
            f"(and '{BASE}' for the bare base model)"
        )
    return names


class _Layout:
    """A MixedLayer for every module holding a delta of any of the model's adapters, kept while the
    adapters stay the same (a server opens a mixed batch at every decoding step: building this each
    time walked every module and every task's deltas). Heads are the batch's (`_heads`)."""

    def __init__(self, model: nn.Module, state: DeltaState):
        self.adapters = tuple(state.adapters.items())  # what it was built from, compared by identity
        self.index = {task: row for row, task in enumerate(state.adapters)}  # a task's row in the tables
        self.paths = {id(m): n for n, m in model.named_modules()}
        self.layers: dict[int, tuple[nn.Module, MixedLayer]] = {}
        self.modules_of: dict[str, list[int]] = {task: [] for task in state.adapters}  # task -> ids of its modules
        for task, adapter in state.adapters.items():
            for path, delta in adapter.deltas.items():
                for module, pname in state.owners[path]:
                    self.layer(module).deltas.setdefault(task, []).append((pname, delta))
                    self.modules_of[task].append(id(module))
        for _, layer in self.layers.values():
            weights = {t: d for t, bound in layer.deltas.items() for p, d in bound if p == "weight"}
            layer.weights = [weights.get(task) for task in self.index]

    def layer(self, module: nn.Module) -> MixedLayer:
        made = self.layers.get(id(module))
        if made is None:
            made = self.layers[id(module)] = (module, MixedLayer(self.paths.get(id(module), "a module"), self.index))
        return made[1]

    def fits(self, state: DeltaState) -> bool:
        return len(self.adapters) == len(state.adapters) and all(
            name == other and adapter is state.adapters.get(other) for (name, adapter), other in zip(self.adapters, state.adapters)
        )


_LAYOUTS: weakref.WeakKeyDictionary[nn.Module, _Layout] = weakref.WeakKeyDictionary()


def _layout(model: nn.Module, state: DeltaState) -> _Layout:
    layout = _LAYOUTS.get(model)
    if layout is None or not layout.fits(state):
        layout = _LAYOUTS[model] = _Layout(model, state)
    return layout


def _heads(model: nn.Module, state: DeltaState, routing: Routing, layout: _Layout) -> set[int]:
    """Give the batch's densely saved heads to the layers of their modules; the ids of those modules."""
    tasks = [t for t in routing.tasks if t != BASE]
    paths = sorted({path for t in tasks for path in state.adapters[t].saved})
    found = set()
    for path in paths:
        module_name, _, pname = path.rpartition(".")
        module = model.get_submodule(module_name)
        own = {t: state.adapters[t].saved.get(path) if t != BASE else None for t in routing.tasks}
        per_task = {t: state.base_saved[path] if p is None else p for t, p in own.items()}  # none: the base's
        shapes = {tuple(p.shape) for p in per_task.values()}
        if len(shapes) > 1:
            described = ", ".join(f"{t}: {tuple(p.shape)}" for t, p in per_task.items())
            raise UsageError(
                f"the tasks of this batch have heads of different shapes in {path} ({described}); their outputs cannot "
                "share one batch: split the batch by head (sparsedelta predict groups tasks by head)"
            )
        for task, tensor in per_task.items():
            layout.layer(module).heads.setdefault(task, {})[pname] = tensor
        found.add(id(module))
    return found


@contextlib.contextmanager
def mixed_batch(model: nn.Module, adapter_names: Sequence[str], *, repeats: int | None = None):
    """Run every forward inside with one task per row of the batch.

    Args:
        model: a model with deltas attached (`load` / `add_delta` under several adapter names).
        adapter_names: one adapter name per row of the batch, "__base__" for the bare base model.
        repeats: the modules' inputs hold each row `repeats` times in a row (a beam search of your
            own, frames flattened into the batch). Modules' inputs are batch-first; one of 3+
            dimensions whose first is a multiple of the rows is refused as sequence-first unless
            declared here (`generate`'s own expansion needs no declaration).

    Yields:
        The model. Inside, each forward (and `generate`) computes row i with the delta of
        adapter_names[i], exactly as the merged model of that task would; on leaving, the active
        adapter is merged again as it was.

    Raises:
        ValueError: an unknown name, the model in training mode, heads of different shapes, or
            (at a forward) a module's input that cannot be split by row, such as a sequence-first one.

    Example:
        with sparsedelta.mixed_batch(model, ["a", "b", "__base__"]):
            logits = model(**batch).logits    # batch of 3 rows
    """
    state = state_of(model)
    names = _check_names(state, adapter_names)
    if repeats is not None and (not isinstance(repeats, int) or repeats < 1):
        raise UsageError(f"repeats must be a positive whole number (how many times each row is repeated); got {repeats!r}")
    if model.training:
        raise UsageError("mixed-task batches are for inference: call model.eval() first (as PEFT requires too)")
    lock, _ = _lock(model)
    with lock:  # no other thread's forward while tasks' entries are in the shared weights
        with _running(model, state, names, repeats) as ran:
            yield ran


@contextlib.contextmanager
def _running(model: nn.Module, state: DeltaState, names: list[str], repeats: int | None = None):
    if model.__dict__.get(_OPEN) is not None:
        raise RuntimeError("this model is already running a mixed-task batch; leave it before opening another")
    routing = Routing(names, repeats)
    if len(routing.tasks) == 1 and (state.merged or routing.tasks == [BASE]):
        # one task for every row: its merged model is exact and runs at the base's speed (an O(k) switch)
        with _only(model, state, routing.tasks[0]), _opened(model, routing):
            yield model
        return
    layout = _layout(model, state)
    chosen = set()
    with all_unmerged(model), _opened(model, routing):  # every delta unmerged (a server keeps none merged): the base serves the batch
        try:
            chosen = {i for t in routing.tasks if t != BASE for i in layout.modules_of[t]}
            chosen |= _heads(model, state, routing, layout)
            for i in chosen:
                module, layer = layout.layers[i]
                layer.routing = routing
                patching.wrap(module, LAYER_KEY, layer)
            routing.layers = [layout.layers[i][1] for i in chosen]
            routing.table_rows = [layout.index[t] for t in routing.tasks if t != BASE]
            _drop_stale(routing)
            yield model
        finally:
            for i in chosen:
                patching.unwrap(layout.layers[i][0], LAYER_KEY)
            for _, layer in layout.layers.values():  # heads given before a refusal too
                layer.routing, layer.heads = None, {}


def _drop_stale(routing: Routing, forward: bool = False) -> None:
    """Forget the tables that a delta of the batch changed since they were built: when the batch
    opens, and at every forward of the model but the first after that."""
    if forward and routing.checked:
        routing.checked = False
        return
    for layer in routing.layers:
        layer.drop_stale(routing.table_rows)
    routing.checked = not forward


@contextlib.contextmanager
def _opened(model: nn.Module, routing: Routing):
    model.__dict__[_OPEN] = routing
    try:
        yield
    finally:
        del model.__dict__[_OPEN]


@contextlib.contextmanager
def _only(model: nn.Module, state: DeltaState, task: str):
    """The model as `task`'s merged model (the base for "__base__"), then as it was."""
    if task == BASE:
        with disabled(model):
            yield
        return
    previous = state.active
    set_adapter(model, task)
    try:
        yield
    finally:
        set_adapter(model, previous)


# -- adapter_names as an argument of forward and generate ------------------------------------------------
def _pre_forward(model: nn.Module, args: tuple, kwargs: dict):
    lock, held = _lock(model)
    lock.acquire()  # released by _post_forward, which runs even when the forward raises
    held.depth = getattr(held, "depth", 0) + 1
    try:
        return _take_names(model, args, kwargs)
    except BaseException:
        _release(model)
        raise


def _release(model: nn.Module) -> None:
    lock, held = _lock(model)
    if getattr(held, "depth", 0) > 0:
        held.depth -= 1
        lock.release()


def _take_names(model: nn.Module, args: tuple, kwargs: dict):
    names = kwargs.pop(ADAPTER_NAMES, None)
    routing = model.__dict__.get(_OPEN)
    if names is not None:
        if routing is not None:  # inside mixed_batch (or generate): the same names may be passed again
            if list(names) != routing.names:
                raise UsageError(f"{ADAPTER_NAMES} differs from the mixed batch this model is already running")
        else:
            stack = contextlib.ExitStack()
            stack.enter_context(mixed_batch(model, names))
            model.__dict__[_CALL] = stack
    elif routing is not None:
        _drop_stale(routing, forward=True)  # a delta may have changed since the last forward of this batch
        # generate expands the rows (beams, num_return_sequences) before calling the model, whose own
        # inputs (input_ids, attention_mask...) are batch-first: their m·B rows are the expansion
        rows, generating = len(routing.names), getattr(_lock(model)[1], "generating", False)
        routing.generated = {
            len(t) // rows
            for t in (*args, *kwargs.values())
            if generating and isinstance(t, torch.Tensor) and t.dim() >= 2 and len(t) > rows and len(t) % rows == 0
        }
    return args, kwargs


def _post_forward(model: nn.Module, args: tuple, output):
    try:
        stack = model.__dict__.pop(_CALL, None)
        if stack is not None:
            stack.close()
    finally:
        _release(model)


def _generate(self: nn.Module, *args, **kwargs):
    """`generate` that takes adapter_names (one per row; the rows that generation repeats, for beams
    or several sequences per prompt, keep their row's task)."""
    names = kwargs.pop(ADAPTER_NAMES, None)
    generate = type(self).generate.__get__(self)
    held = _lock(self)[1]
    outer, held.generating = getattr(held, "generating", False), True  # this thread's forwards are generate's
    try:
        if names is None:
            return generate(*args, **kwargs)
        with mixed_batch(self, names):
            return generate(*args, **kwargs)
    finally:
        held.generating = outer


def install(model: nn.Module) -> None:
    """Let `model(..., adapter_names=[...])` and `model.generate(..., adapter_names=[...])` run mixed
    batches (done when a model gets its first delta)."""
    if any(h is _pre_forward for h in model._forward_pre_hooks.values()):
        return
    model.register_forward_pre_hook(_pre_forward, with_kwargs=True)
    model.register_forward_hook(_post_forward, always_call=True)
    if callable(getattr(type(model), "generate", None)) and "generate" not in model.__dict__:
        model.__dict__["generate"] = functools.partial(_generate, model)  # picklable, unlike a bound method


def uninstall(model: nn.Module) -> None:
    """Undo `install` (when the last delta leaves the model)."""
    for hooks, hook in ((model._forward_pre_hooks, _pre_forward), (model._forward_hooks, _post_forward)):
        for key in [k for k, h in hooks.items() if h is hook]:
            del hooks[key]
            model._forward_hooks_always_called.pop(key, None)
            model._forward_hooks_with_kwargs.pop(key, None)
            model._forward_pre_hooks_with_kwargs.pop(key, None)
    generate = model.__dict__.get("generate")
    if isinstance(generate, functools.partial) and generate.func is _generate:
        del model.__dict__["generate"]


MODEL_HOOKS.append((install, uninstall))  # every model that gets a delta takes adapter_names=
