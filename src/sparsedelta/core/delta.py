"""The central object: a sparse delta over one frozen tensor.

θ_task = θ + scatter(indices, values). The delta is kept *merged*: the model's own weight tensor
holds θ + delta at all times while the delta is active, so the forward pass is the model's
ordinary forward. θ's original values at the selected positions (`base`) are kept, which makes
unmerging bit-exact. Entries can later be frozen (SaRA's progressive re-selection): they stay
merged and are saved, but are no longer trained.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass(slots=True)
class _MergeState:
    """Bookkeeping of the merged weight, kept off nn.Module's slow __setattr__: switching tasks
    updates it for every tensor."""

    merged: bool = False
    synced_version: int = -1
    cache_key: tuple | None = None  # (values' storage, version) the cached merged values belong to
    cache: torch.Tensor | None = None


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
        raise ValueError(f"{values.numel()} values of shape {tuple(values.shape)} for {len(indices)} positions")
    if len(indices) > 1 and not bool((indices[1:] > indices[:-1]).all()):
        indices, order = torch.sort(indices, stable=True)
        values = values[order.to(values.device)]
        repeated = indices[1:] == indices[:-1]
        if bool(repeated.any()):
            position = int(indices[1:][repeated][0])
            raise ValueError(f"position {position} is given twice with values; each position takes one value")
    return indices, values


class SparseDelta(nn.Module):
    def __init__(self, weight: torch.Tensor, indices: torch.Tensor, values: torch.Tensor | None = None):
        super().__init__()
        if not weight.is_contiguous():
            raise ValueError("sparse deltas need a contiguous weight tensor; call .contiguous() on the parameter first")
        indices = torch.as_tensor(indices, dtype=torch.long, device=weight.device).reshape(-1)
        if values is None:
            indices = torch.unique(indices)  # sorted, no duplicates
        else:
            indices, values = _sorted_pairs(indices, values)
        if len(indices) and (indices[0] < 0 or indices[-1] >= weight.numel()):
            raise IndexError(
                f"delta positions must lie in [0, {weight.numel()}) for a tensor of shape {tuple(weight.shape)}"
            )
        self.__dict__["weight"] = weight  # a reference, not a registered parameter of this module
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

    # -- keeping the weight up to date ------------------------------------------------------------
    # Switching tasks calls merge/unmerge for every tensor, so they stay lean: put_ on the flat
    # view (about twice as fast as index_copy_ here), numel() rather than len().
    def _write(self, indices: torch.Tensor, new: torch.Tensor) -> None:
        if indices.numel():
            with torch.no_grad():
                self.weight.view(-1).put_(indices, new.to(self.weight.dtype))

    def _merged_values(self, base: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        return base.to(values.dtype) + values.detach()

    def _merged_trained(self) -> torch.Tensor:
        """θ + delta at the trainable positions in the weight's dtype, kept until the values change,
        so switching back to this delta is a single write per tensor."""
        state, key = self._merge, (self.values.data_ptr(), self.values._version)
        if state.cache_key != key:
            state.cache = self._merged_values(self.base, self.values).to(self.weight.dtype)
            state.cache_key = key
        return state.cache

    def merge(self) -> None:
        if self.frozen_indices.numel():
            self._write(self.frozen_indices, self._merged_values(self.frozen_base, self.frozen_values))
        self._merge.merged = True
        self._merge.synced_version = -1
        self.sync()

    def unmerge(self) -> None:
        self._write(self.indices, self.base)
        self._write(self.frozen_indices, self.frozen_base)
        self._merge.merged = False

    def sync(self) -> None:
        """Bring the merged weight up to date after the values changed (e.g. an optimizer step)."""
        state, version = self._merge, self.values._version
        if state.merged and version != state.synced_version:
            self._write(self.indices, self._merged_trained())
            state.synced_version = version

    def csr(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The trainable positions as the CSR pattern (crow, col) of the 2-D weight, for sampled
        products; cached until the positions change."""
        cached = getattr(self, "_csr_cache", None)
        if cached is None or cached[0] is not self.indices or cached[1] != self.indices._version:
            rows, cols = self.shape
            index_dtype = torch.int32 if max(rows, cols, len(self.indices)) < 2**31 else torch.long
            crow = torch.zeros(rows + 1, dtype=index_dtype, device=self.indices.device)
            crow[1:] = torch.bincount(self.indices // cols, minlength=rows).cumsum(0)
            cached = (self.indices, self.indices._version, (crow, (self.indices % cols).to(index_dtype)))
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
        self._merge.synced_version = -1
        self._merge.cache_key = self._merge.cache = None
        return keep

    def extra_repr(self) -> str:
        return f"shape={self.shape}, trainable={len(self.indices)}, frozen={len(self.frozen_indices)}"
