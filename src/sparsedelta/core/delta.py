"""The central object: a sparse delta over one frozen tensor.

θ_task = θ + scatter(indices, values). The delta is kept *merged*: the model's own weight tensor
holds θ + delta at all times while the delta is active, so the forward pass is the model's
ordinary forward. θ's original values at the selected positions (`base`) are kept, which makes
unmerging bit-exact. Entries can later be frozen (SaRA's progressive re-selection): they stay
merged and are saved, but are no longer trained.

Two kinds of weight cannot hold θ + delta, and there the delta is applied as a *correction* instead
(the weight keeps θ; the forward adds the delta's effect, `adapters.DeltaLayer`): a weight stored in
bfloat16 or float16, where a delta below half of θ's last bit would round away (bf16 keeps 8
significant bits: +1e-4 on θ = 0.05 is lost), and a weight sharded across processes (FSDP), which
no process holds whole. `holds_delta` says which applies; it follows the weight's dtype, so
`model.float()` turns a corrected delta into a merged one and `model.bfloat16()` the other way.
A quantized weight (bitsandbytes int8/4-bit, core/quantized.py) is always corrected: its packed
bytes are never written, and θ (shape, `base`) is its dequantized value, given as `theta`.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import UsageError
from . import quantized


@dataclass(slots=True)
class _MergeState:
    """Bookkeeping of the merged weight, kept off nn.Module's slow __setattr__: switching tasks
    updates it for every tensor."""

    merged: bool = False
    synced_key: tuple | None = None  # (values' storage, version) last written: a copy's values have new storage
    cache_key: tuple | None = None  # (values' storage, version, dtype) the cached merged values belong to
    cache: torch.Tensor | None = None
    written: torch.dtype | str | None = None  # the weight holds θ + delta in this dtype, or "base": θ (corrected)
    corrected: bool = False  # applied as a correction whatever the dtype (a sharded weight)


def holds_delta(dtype: torch.dtype) -> bool:
    """Whether a weight of this dtype can hold θ + delta (float32 and wider), rather than take the
    delta as a correction in the forward (bfloat16, float16)."""
    return dtype.itemsize >= 4

def replace_data(param: torch.Tensor, data: torch.Tensor) -> None:
    """Give `param` new data of another size, keeping the same Parameter object (optimizers hold it).

    `param.data = data` alone keeps the parameter's gradient accumulator, which remembers the old
    size, while any earlier graph (e.g. the last loss) is alive, and the next backward then fails.
    Autograd drops that accumulator when the dtype changes, so pass through another dtype."""
    with torch.no_grad():
        param.data = data.to(torch.float64 if data.dtype != torch.float64 else torch.float32)
        param.data = data


def _sorted_pairs(indices: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions sorted with their values kept beside them; a repeated position is refused (which of
    its values would be meant?)."""
    if values.shape != indices.shape:
        raise UsageError(f"{values.numel()} values of shape {tuple(values.shape)} for {len(indices)} positions")
    if len(indices) > 1 and not bool((indices[1:] > indices[:-1]).all()):
        indices, order = torch.sort(indices, stable=True)
        values = values[order.to(values.device)]
        repeated = indices[1:] == indices[:-1]
        if bool(repeated.any()):
            position = int(indices[1:][repeated][0])
            raise UsageError(f"position {position} is given twice with values; each position takes one value")
    return indices, values


class SparseDelta(nn.Module):
    # Called during backward with this tensor's dense gradient (transient, one layer at a time) by the
    # fast paths and the generic one (core/ops.py); a method sets it to score positions outside the
    # delta (SpIEL's growth) and clears it again. A class default, so deltas pickled before it load.
    grad_observer = None

    def __init__(
        self,
        weight: torch.Tensor,
        indices: torch.Tensor,
        values: torch.Tensor | None = None,
        theta: torch.Tensor | None = None,
        layer: nn.Module | None = None,
    ):
        """`theta`: for a quantized `weight`, its dequantized value (shape, θ at the positions), and
        `layer` the quantized layer owning it (it holds the scales); the delta is then a correction for good."""
        super().__init__()
        packed, self.quantized = weight, None
        if theta is not None:
            self.quantized = quantized.dtype_name(weight)  # 'int8', 'nf4', 'fp4': recorded in the delta file
            weight = theta
        if not weight.is_contiguous():
            raise UsageError("sparse deltas need a contiguous weight tensor; call .contiguous() on the parameter first")
        indices = torch.as_tensor(indices, dtype=torch.long, device=weight.device).reshape(-1)
        if values is None:
            indices = torch.unique(indices)  # sorted, no duplicates
        else:
            indices, values = _sorted_pairs(indices, values)
        if len(indices) and (indices[0] < 0 or indices[-1] >= weight.numel()):
            raise IndexError(
                f"delta positions must lie in [0, {weight.numel()}) for a tensor of shape {tuple(weight.shape)}"
            )
        # A weak reference, not a registered parameter: FSDP replaces the module's weight by its shards,
        # and a strong one would keep the whole original tensor alive on every process.
        self.__dict__["_weight_ref"] = weakref.ref(packed)
        self.__dict__["_layer_ref"] = (lambda: None) if layer is None else weakref.ref(layer)
        self.shape = tuple(weight.shape)
        self.register_buffer("indices", indices)
        self.register_buffer("base", weight.detach().reshape(-1)[indices].clone())
        dtype = torch.promote_types(weight.dtype, torch.float32)  # train in ≥ float32 even over bf16 weights
        if values is None:
            values = torch.zeros(len(indices), dtype=dtype, device=weight.device)
        self.values = nn.Parameter(values.detach().to(device=weight.device, dtype=dtype).clone())
        empty = indices[:0]
        self.register_buffer("frozen_indices", empty.clone())
        self.register_buffer("frozen_base", self.base[:0].clone())
        self.register_buffer("frozen_values", self.values.detach()[:0].clone())
        self._merge = _MergeState()
        if self.quantized:
            self._merge.corrected, self._merge.written = True, "base"

    def _apply(self, fn, recurse=True):
        """Device moves and casts apply to everything but that a narrowing cast (model.bfloat16(),
        .half()) reaches θ's values (`base`, as the weight's) and not the trained values, which stay
        in at least float32."""
        kept = {"values": self.values.data, "frozen_values": self.frozen_values}
        super()._apply(fn, recurse)
        with torch.no_grad():
            if self.values.dtype.itemsize < kept["values"].dtype.itemsize:
                self.values.data = kept["values"].to(self.values.device)
            if self.frozen_values.dtype.itemsize < kept["frozen_values"].dtype.itemsize:
                self.frozen_values = kept["frozen_values"].to(self.frozen_values.device)
        self._merge.cache_key = self._merge.cache = None
        return self

    # copies and pickles hold the weight strongly, so that a deep copy of the model points at the copy's weight
    def __getstate__(self):
        state = dict(self.__dict__)
        state["_weight"] = state.pop("_weight_ref")()
        state["_layer"] = state.pop("_layer_ref")()
        return state

    def __setstate__(self, state):
        weight, layer = state.pop("_weight"), state.pop("_layer", None)
        super().__setstate__(state)
        self.__dict__["_weight_ref"] = (lambda: None) if weight is None else weakref.ref(weight)
        self.__dict__["_layer_ref"] = (lambda: None) if layer is None else weakref.ref(layer)

    @property
    def weight(self) -> torch.Tensor:
        """The tensor this delta is attached to."""
        weight = self._weight_ref()
        if weight is None:
            raise RuntimeError(
                f"the tensor of shape {self.shape} this delta was attached to no longer exists (its module's parameter "
                "was replaced, e.g. by load_state_dict(assign=True) or FSDP's fully_shard); attach the delta again, or "
                "call sparsedelta.core.adapters.use_correction(model) before sharding"
            )
        return weight

    @property
    def holds_delta(self) -> bool:
        """True: the weight holds θ + delta (merged); False: the forward adds the delta as a correction."""
        return not self._merge.corrected and holds_delta(self.weight.dtype)

    # -- keeping the weight up to date ------------------------------------------------------------
    # Switching tasks calls merge/unmerge for every tensor, so they stay lean: put_ on the flat
    # view (about twice as fast as index_copy_ here), numel() rather than len().
    def _write(self, indices: torch.Tensor, new: torch.Tensor) -> None:
        if indices.numel():
            with torch.no_grad():
                self.weight.view(-1).put_(indices, new.to(self.weight.dtype))

    def _write_base(self) -> None:
        self._write(self.indices, self.base)
        self._write(self.frozen_indices, self.frozen_base)

    def _merged_values(self, base: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        return base.to(values.dtype) + values.detach()

    def _merged_trained(self) -> torch.Tensor:
        """θ + delta at the trainable positions in the weight's dtype, kept until the values change,
        so switching back to this delta is a single write per tensor."""
        state, key = self._merge, (self.values.data_ptr(), self.values._version, self.weight.dtype)
        if state.cache_key != key:
            state.cache = self._merged_values(self.base, self.values).to(self.weight.dtype)
            state.cache_key = key
        return state.cache

    def merge(self) -> None:
        self._merge.merged = True
        self._merge.synced_key = None
        self._merge.written = None
        self.sync()

    def unmerge(self) -> None:
        if self._merge.written not in ("base", None):  # a corrected delta never wrote into the weight
            self._write_base()
        self._merge.merged = False
        self._merge.written = None

    def sync(self) -> None:
        """Bring the merged weight up to date after the values changed (e.g. an optimizer step), or,
        for a corrected delta, make sure the weight holds θ (after a change of dtype)."""
        state = self._merge
        if not state.merged or state.corrected:  # a sharded weight: never written
            return
        dtype = self.weight.dtype
        if not holds_delta(dtype):
            if state.written != "base":  # e.g. merged in float32, then model.bfloat16()
                self._write_base()
                state.written = "base"
            return
        if state.written != dtype:  # first write, or the weight's dtype changed since
            state.cache_key = state.cache = None
            if self.frozen_indices.numel():
                self._write(self.frozen_indices, self._merged_values(self.frozen_base, self.frozen_values))
            state.written, state.synced_key = dtype, None
        key = (self.values.data_ptr(), self.values._version)
        if key != state.synced_key:
            self._write(self.indices, self._merged_trained())
            state.synced_key = key

    def use_correction(self) -> None:
        """Apply this delta as a correction from now on, whatever the weight's dtype (before sharding
        the weight): the weight gets θ back and is never written again."""
        if self._merge.written not in ("base", None):
            self._write_base()
        self._merge.written = "base"
        self._merge.corrected = True

    def added_to(self, tensor: torch.Tensor) -> torch.Tensor:
        """θ + delta in float32 from `tensor` (the weight holding θ, e.g. a bfloat16 one or an
        all-gathered shard), differentiable with respect to `values`: a corrected delta's exact weight."""
        flat = tensor.detach().reshape(-1).float()
        if self.frozen_indices.numel():
            flat = flat.index_add(0, self.frozen_indices, self.frozen_values.float())
        return flat.index_add(0, self.indices, self.values.float()).view(tensor.shape)

    @property
    def layer(self) -> nn.Module | None:
        """The quantized layer owning the weight (None for a float weight)."""
        return self._layer_ref()

    def dense_weight(self) -> torch.Tensor:
        """The weight as the model holds it, dense: itself, or a quantized weight dequantized (θ, as a
        new float32 tensor of the logical shape)."""
        if self.quantized:
            layer = self._layer_ref()
            return quantized.dequantize(self.weight if layer is None else layer)
        return self.weight.detach()

    def every_entry(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(positions, delta values in float32) of every entry, trained then frozen; not differentiable."""
        if not self.frozen_indices.numel():
            return self.indices, self.values.detach().float()
        positions = torch.cat([self.indices, self.frozen_indices])
        return positions, torch.cat([self.values.detach().float(), self.frozen_values.float()])

    def csr(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The trainable positions as the CSR pattern (crow, col) of the 2-D weight, for sampled
        products; cached until the positions change."""
        cached = getattr(self, "_csr_cache", None)
        if cached is None or cached[0] is not self.indices or cached[1] != self.indices._version:
            cached = (self.indices, self.indices._version, csr_of(self.indices, self.shape))
            self._csr_cache = cached
        return cached[2]

    # -- views for saving and analysis ------------------------------------------------------------
    @property
    def num_entries(self) -> int:
        return len(self.indices) + len(self.frozen_indices)

    def all_entries(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(positions, base values, delta values) of every entry, trained and frozen, sorted."""
        positions = torch.cat([self.indices, self.frozen_indices])
        order = torch.argsort(positions)
        base = torch.cat([self.base, self.frozen_base])[order]
        values = torch.cat([self.values.detach(), self.frozen_values])[order]
        return positions[order], base, values

    def current_values(self) -> torch.Tensor:
        """θ + delta at the trainable positions, differentiable with respect to `values`."""
        return self.base.to(self.values.dtype) + self.values

    # -- re-selection -----------------------------------------------------------------------------
    def freeze_entries(self, keep: torch.Tensor) -> torch.Tensor:
        """Stop training the entries where `keep` is False; they stay merged at their trained values.
        Shrinks `values` in place (same Parameter object), so optimizers keep referring to it.
        Returns the boolean `keep` for slicing optimizer state."""
        keep = keep.to(device=self.indices.device, dtype=torch.bool)
        self.sync()  # the weight must hold the leaving entries' final values, not those of the last forward
        drop = ~keep
        self.frozen_indices = torch.cat([self.frozen_indices, self.indices[drop]])
        self.frozen_base = torch.cat([self.frozen_base, self.base[drop]])
        self.frozen_values = torch.cat([self.frozen_values, self.values.detach()[drop]])
        self.indices = self.indices[keep]
        self.base = self.base[keep]
        with torch.no_grad():
            replace_data(self.values, self.values.data[keep])
            if self.values.grad is not None:
                self.values.grad = self.values.grad[keep]
        self._merge.synced_key = None
        self._merge.cache_key = self._merge.cache = None
        return keep

    # -- moving entries ---------------------------------------------------------------------------
    def replace_entries(self, slots: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Move the trainable entries at `slots` (their places in `indices`) to the flat `positions`,
        which must be outside the delta (trained and frozen): their old positions get θ back exactly,
        the new ones start at value 0 over θ. The count k and the Parameter object stay; `indices`
        stay sorted. Needs the delta merged (its adapter active), so the weight holds θ at every
        position outside it. Returns `order`: the entries' new order as places of the old (after
        the replacement), for permuting per-entry state such as optimizer moments the same way."""
        slots = torch.as_tensor(slots, dtype=torch.long, device=self.indices.device).reshape(-1)
        positions = torch.as_tensor(positions, dtype=self.indices.dtype, device=self.indices.device).reshape(-1)
        if len(slots) != len(positions):
            raise UsageError(f"{len(slots)} entries to move but {len(positions)} new positions")
        if not self._merge.merged:
            raise UsageError("entries can only be moved while their adapter is active (sparsedelta.set_adapter)")
        if len(torch.unique(slots)) != len(slots) or len(torch.unique(positions)) != len(positions):
            raise UsageError("each entry moves once, and to a position of its own")
        if len(positions) and (int(positions.min()) < 0 or int(positions.max()) >= self.weight.numel()):
            raise IndexError(f"new positions must lie in [0, {self.weight.numel()}) for a tensor of shape {self.shape}")
        occupied = torch.cat([self.indices, self.frozen_indices])
        if bool(torch.isin(positions, occupied).any()):
            raise UsageError("a new position is already an entry of the delta; move entries to free positions only")
        with torch.no_grad():
            if self._merge.written not in ("base", None):
                self._write(self.indices[slots], self.base[slots])  # θ back, bit for bit, where entries leave
            indices, base = self.indices.clone(), self.base.clone()
            values = self.values.detach().clone()
            indices[slots] = positions
            base[slots] = self.weight.detach().reshape(-1)[positions].to(base.dtype)  # θ: no entry was there
            values[slots] = 0
            order = torch.argsort(indices)
            self.indices, self.base = indices[order], base[order]
            self.values.copy_(values[order])  # same object, new version: the weight follows at the next sync
            if self.values.grad is not None:
                grad = self.values.grad.clone()
                grad[slots] = 0
                self.values.grad = grad[order]
        self._merge.synced_key = None
        self._merge.cache_key = self._merge.cache = None
        self.sync()
        return order

    def extra_repr(self) -> str:
        return f"shape={self.shape}, trainable={len(self.indices)}, frozen={len(self.frozen_indices)}"


def csr_of(indices: torch.Tensor, shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """Sorted flat positions in a 2-D tensor of `shape` as a CSR pattern (crow, col)."""
    rows, cols = shape
    index_dtype = torch.int32 if max(rows, cols, len(indices)) < 2**31 else torch.long
    crow = torch.zeros(rows + 1, dtype=index_dtype, device=indices.device)
    crow[1:] = torch.bincount(indices // cols, minlength=rows).cumsum(0)
    return crow, (indices % cols).to(index_dtype)
