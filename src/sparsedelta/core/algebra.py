"""Delta algebra in index space: task arithmetic, TIES, DARE and magnitude pruning of sparse deltas.

Every function works on the entries of one tensor, `Entries(positions, values)` (sorted, unique
int64 flat positions and the delta's values there), or on a whole delta, a dict of them by
parameter path, as `sparsedelta.read` gives them. Nothing here allocates a tensor of a weight's
size: a union of positions is `torch.cat` + `torch.unique(return_inverse=True)` and values meet
through `index_add_`, so every operation costs O(k log k) in the entries, whatever the weight's size.
Results are sorted and unique again; values keep the inputs' (promoted) dtype, so pass float64
values for exact arithmetic.

Counting "density": as everywhere in sparsedelta, a density is a fraction of the *targeted
entries* (the tensors' sizes, `numels`), not of a delta's stored entries, and it is counted over
all tensors of a delta together (a global magnitude threshold, as Diff Pruning's projection and the
TIES authors' code, which flattens the whole model) unless `per_tensor=True`. A delta trained at 1%
density trimmed to `density=0.2` is therefore left whole; the TIES paper's "keep the top 20% of each
task vector" on such deltas is `density=0.002` (or a count, `k`).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from typing import NamedTuple

import torch

from ..errors import UsageError
from .selection import budget, check_density, smallest_k

HOWS = ("sum", "mean", "ties", "dare", "magnitude")


class Entries(NamedTuple):
    """One tensor's delta: sorted unique flat positions (int64) and the values there."""

    positions: torch.Tensor
    values: torch.Tensor


Delta = dict[str, Entries]  # by parameter path


# -- one tensor ------------------------------------------------------------------------------------
def _weights(weights: Sequence[float] | None, n: int) -> list[float]:
    if n == 0:
        raise UsageError("nothing to combine: pass at least one delta")
    if weights is None:
        return [1.0] * n
    weights = [float(w) for w in weights]
    if len(weights) != n:
        raise UsageError(f"{len(weights)} weights for {n} deltas; give one weight per delta")
    if not all(math.isfinite(w) for w in weights):
        raise UsageError(f"weights must be finite numbers, got {weights}")
    return weights


def _union(items: Sequence[Entries], weights: Sequence[float]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(union of positions, index of each input entry in it, the weighted input values), the
    inputs' entries concatenated in order."""
    positions, inverse = torch.unique(torch.cat([e.positions for e in items]), sorted=True, return_inverse=True)
    values = torch.cat([e.values * w for e, w in zip(items, weights, strict=True)])
    return positions, inverse, values


def weighted_sum(items: Sequence[Entries], weights: Sequence[float] | None = None) -> Entries:
    """Σᵢ wᵢ·δᵢ, task arithmetic (Ilharco et al., "Editing models with task arithmetic", 2023).

    Args:
        items: each tensor's entries (sorted unique positions, values) of one delta.
        weights: wᵢ per delta (default 1 each); a negative weight subtracts a task.

    Returns:
        Entries on the union of the positions, values added where positions overlap. An entry that
        sums to exactly 0 keeps its position: the union is the result's support by definition
        (`drop_zeros` removes such entries)."""
    weights = _weights(weights, len(items))
    positions, inverse, values = _union(items, weights)
    return Entries(positions, values.new_zeros(len(positions)).index_add_(0, inverse, values))


def negate(item: Entries) -> Entries:
    """−δ: the same positions, values negated (task negation, Ilharco et al. 2023)."""
    return Entries(item.positions, -item.values)


def subtract(a: Entries, b: Entries) -> Entries:
    """δa − δb on the union of the positions."""
    return weighted_sum([a, b], [1.0, -1.0])


def drop_zeros(item: Entries) -> Entries:
    """The entries whose value is not exactly 0."""
    keep = item.values != 0
    return Entries(item.positions[keep], item.values[keep])


def keep_largest(item: Entries, k: int) -> Entries:
    """The k entries of largest |value| (all of them when k ≥ their count); ties go to the lower
    position, so the count is exact. Positions stay sorted."""
    return trim({"": item}, k=k)[""]


def dare(item: Entries, p: float, seed: int) -> Entries:
    """DARE (Yu et al., "Language models are Super Mario", 2023): drop each entry independently
    with probability p and rescale the survivors by 1/(1−p), so the expected delta is unchanged.

    The dropped entries leave the delta (their positions go). The draw comes from a CPU
    `torch.Generator` seeded with `seed`, so one seed gives one result on any device."""
    if not 0 <= p < 1:
        raise UsageError(f"DARE's drop probability must lie in [0, 1), got {p}")
    generator = torch.Generator().manual_seed(int(seed))
    keep = (torch.rand(len(item.values), generator=generator, dtype=torch.float64) >= p).to(item.values.device)
    return Entries(item.positions[keep], item.values[keep] / (1 - p))


def ties_merge(trimmed: Sequence[Entries], weights: Sequence[float] | None = None) -> Entries:
    """Steps 2 and 3 of TIES-merging (Yadav et al., "Resolving interference when merging models",
    NeurIPS 2023) on already trimmed deltas (step 1 is `trim`).

    Elect: per position, γ = sign(Σᵢ wᵢ·τ̂ᵢ), the sign of the summed (weighted) trimmed values.
    Disjoint merge: the mean of wᵢ·τ̂ᵢ over the deltas whose entry there has sign γ; entries that
    disagree, or are 0, do not count. With all wᵢ = 1 this is the paper; equal weights λ scale the
    result by λ (the paper's λ), and a negative wᵢ enters task i negated.

    Returns:
        Entries at the positions where at least one delta agrees with the elected sign; positions
        whose sum is exactly 0 have no elected sign and are left out."""
    weights = _weights(weights, len(trimmed))
    positions, inverse, values = _union(trimmed, weights)
    elected = torch.sign(values.new_zeros(len(positions)).index_add_(0, inverse, values))
    agree = (torch.sign(values) == elected[inverse]) & (values != 0)
    sums = values.new_zeros(len(positions)).index_add_(0, inverse, torch.where(agree, values, 0))
    counts = values.new_zeros(len(positions)).index_add_(0, inverse, agree.to(values.dtype))
    keep = counts > 0
    return Entries(positions[keep], sums[keep] / counts[keep])


def intersect(a: Entries, b: Entries) -> tuple[torch.Tensor, torch.Tensor]:
    """(indices into a, indices into b) of the positions both have, in position order."""
    at = torch.searchsorted(a.positions, b.positions)
    hit = at < len(a.positions)
    hit[hit.clone()] = a.positions[at[hit]] == b.positions[hit]
    return at[hit], torch.nonzero(hit).squeeze(1)


# -- whole deltas ----------------------------------------------------------------------------------
def trim(
    delta: Delta,
    numels: dict[str, int] | None = None,
    density: float | None = None,
    k: int | None = None,
    per_tensor: bool = False,
) -> Delta:
    """Keep the largest |values| of a delta: TIES's step 1, and magnitude pruning.

    Args:
        delta: entries by tensor.
        numels: each tensor's size (number of targeted entries); needed with `density`.
        density: keep round(density · n) entries, n = the targeted entries of all tensors together
            (or of each tensor with `per_tensor`); at least 1.
        k: keep k entries (over all tensors, or in each with `per_tensor`). Give density or k.
        per_tensor: count within each tensor instead of one global magnitude threshold.

    Returns:
        The kept entries by tensor (a tensor may keep none); ties go to the earlier tensor, then
        the lower position, so the count is exact."""
    if (density is None) == (k is None):
        raise UsageError("give exactly one of density (a fraction of the targeted entries) or k (a count)")
    if density is not None:
        check_density(density)
        if numels is None or not set(delta) <= set(numels):
            raise UsageError("a density needs every tensor's size: pass numels={name: number of entries}")
    elif k < 0:
        raise UsageError(f"k must be ≥ 0, got {k}")
    if per_tensor:
        return {
            name: trim({name: e}, k=k if density is None else budget(numels[name], density))[name]
            for name, e in delta.items()
        }
    if density is not None:
        k = budget(sum(numels[name] for name in delta), density)
    if k >= sum(len(e.values) for e in delta.values()):
        return dict(delta)
    if k == 0:
        return {name: Entries(e.positions[:0], e.values[:0]) for name, e in delta.items()}
    chosen = smallest_k({name: -e.values.abs() for name, e in delta.items()}, k)
    return {name: Entries(e.positions[chosen[name]], e.values[chosen[name]]) for name, e in delta.items()}


def tensor_seed(seed: int, index: int, name: str) -> int:
    """A seed of its own for each (delta, tensor): a tensor's DARE draw does not depend on which
    other tensors a delta has, nor on their order."""
    digest = hashlib.sha256(f"{int(seed)}/{index}/{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def check_options(
    how: str,
    density: float | None = None,
    k: int | None = None,
    drop: float | None = None,
) -> None:
    """Refuse option combinations `combine` would not use, before any file is read."""
    if how not in HOWS:
        raise UsageError(f"how must be one of {list(HOWS)}, got {how!r}")
    budgeted = how in ("ties", "magnitude")
    if budgeted and (density is None) == (k is None):
        raise UsageError(
            f"how={how!r} keeps the largest |values|: give density (a fraction of the targeted entries) or k"
        )
    if not budgeted and (density is not None or k is not None):
        raise UsageError(f"density and k apply to how='ties' or 'magnitude', not {how!r}")
    if how == "dare":
        if drop is None or not 0 <= drop < 1:
            raise UsageError(f"how='dare' needs drop, the probability in [0, 1) to drop each entry (got {drop})")
    elif drop is not None:
        raise UsageError(f"drop applies to how='dare', not {how!r}")
    if density is not None:
        check_density(density)


def combine(
    deltas: Sequence[Delta],
    how: str = "sum",
    weights: Sequence[float] | None = None,
    numels: dict[str, int] | None = None,
    density: float | None = None,
    k: int | None = None,
    drop: float | None = None,
    seed: int = 0,
    per_tensor: bool = False,
) -> Delta:
    """One delta from several, tensor by tensor (a tensor missing from a delta counts as empty).

    how:
        "sum": Σ wᵢ·δᵢ (task arithmetic; weights (1, −1) subtract).
        "mean": Σ wᵢ·δᵢ / Σ wᵢ (the plain mean by default); an entry a delta lacks counts as 0.
        "ties": trim each δᵢ to `density`/`k` (`trim`), then elect signs and take the disjoint mean
            of wᵢ·τ̂ᵢ (`ties_merge`).
        "dare": DARE on each δᵢ (`dare` with probability `drop`, seeded per delta and tensor from
            `seed` by `tensor_seed`), then Σ wᵢ·δᵢ.
        "magnitude": Σ wᵢ·δᵢ, then keep the largest |values| (`trim` to `density`/`k`).

    Args:
        deltas: entries by tensor, one dict per delta.
        weights: wᵢ per delta (default 1 each).
        numels: each tensor's size, needed with `density`.
        density, k, per_tensor: the budget of "ties" and "magnitude" (see `trim`).
        drop, seed: DARE's drop probability and seed.

    Returns:
        Entries by tensor, sorted and unique; a tensor may end with none."""
    check_options(how, density, k, drop)
    weights = _weights(weights, len(deltas))
    if how == "mean" and sum(weights) == 0:
        raise UsageError(f"how='mean' divides by the sum of the weights, which is 0 for {weights}; use how='sum'")
    if how == "ties":
        deltas = [trim(d, numels, density, k, per_tensor) for d in deltas]
    if how == "dare":
        deltas = [{n: dare(e, drop, tensor_seed(seed, i, n)) for n, e in d.items()} for i, d in enumerate(deltas)]
    names = list(dict.fromkeys(n for d in deltas for n in d))
    out = {}
    for name in names:
        like = next(d[name] for d in deltas if name in d)
        items = [d.get(name, Entries(like.positions[:0], like.values[:0])) for d in deltas]
        out[name] = ties_merge(items, weights) if how == "ties" else weighted_sum(items, weights)
        if how == "mean":
            out[name] = Entries(out[name].positions, out[name].values / sum(weights))
    if how == "magnitude":
        out = trim(out, numels, density, k, per_tensor)
    return out
