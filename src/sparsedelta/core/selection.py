"""Position-selection rules shared by the methods: a threshold, or an exact budget of k entries."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping

import torch

from ..errors import UsageError


class LazyScores(Mapping):
    """A score per tensor computed when read and not kept, so a rule over a quantized base holds one
    dequantized layer at a time (core/quantized.py's `Dequantized`), never the whole model."""

    def __init__(self, tensors: Mapping[str, torch.Tensor], score: Callable[[torch.Tensor], torch.Tensor]):
        self._tensors, self._score = tensors, score

    def __getitem__(self, name: str) -> torch.Tensor:
        return self._score(self._tensors[name])

    def __iter__(self) -> Iterator[str]:
        return iter(self._tensors)

    def __len__(self) -> int:
        return len(self._tensors)


def scores_of(tensors: Mapping[str, torch.Tensor], score: Callable[[torch.Tensor], torch.Tensor]) -> Mapping:
    """score(t) for every tensor: all at once (a dict), or as read (`LazyScores`) when the tensors
    themselves are made as read (`tensors.lazy`: a quantized base's dequantized θ)."""
    if getattr(tensors, "lazy", False):
        return LazyScores(tensors, score)
    return {name: score(t) for name, t in tensors.items()}


def check_density(density: float) -> None:
    if not 0 < density <= 1:
        raise UsageError(f"density must lie in (0, 1], got {density}; e.g. 0.01 trains 1% of the targeted entries")


def below(scores: dict[str, torch.Tensor], threshold: float) -> dict[str, torch.Tensor]:
    """Flat positions where score < threshold, per tensor."""
    return {name: torch.nonzero(s.reshape(-1) < threshold).squeeze(1) for name, s in scores.items()}


def smallest_k(scores: dict[str, torch.Tensor], k: int) -> dict[str, torch.Tensor]:
    """Exactly k positions with the smallest scores over all tensors together; ties are broken by
    order (tensor order, then position), so the count is exact. Scores computed as read
    (`LazyScores`) are walked twice, one tensor at a time (`_smallest_k_streamed`)."""
    if not isinstance(scores, dict):
        return _smallest_k_streamed(scores, k)
    # at least float32 (kthvalue on CPU), float64 kept: a float32 rounding would tie distinct scores
    flat = torch.cat([s.detach().reshape(-1).to(torch.promote_types(s.dtype, torch.float32)).cpu() for s in scores.values()])
    if not 0 < k <= len(flat):
        raise ValueError(f"cannot select {k} of {len(flat)} entries")
    kth = torch.kthvalue(flat, k).values
    strictly = flat < kth
    ties = torch.nonzero(flat == kth).squeeze(1)[: k - int(strictly.sum())]
    chosen = strictly
    chosen[ties] = True
    out, start = {}, 0
    for name, s in scores.items():
        n = s.numel()
        out[name] = torch.nonzero(chosen[start : start + n]).squeeze(1).to(s.device)
        start += n
    return out


def _flat(score: torch.Tensor) -> torch.Tensor:
    return score.detach().reshape(-1).to(torch.promote_types(score.dtype, torch.float32)).cpu()


def _smallest_k_streamed(scores: Mapping[str, torch.Tensor], k: int) -> dict[str, torch.Tensor]:
    """`smallest_k` holding one tensor's scores and k kept values at a time: a first pass keeps the
    k smallest values seen (so the k-th smallest overall is their largest), a second takes every
    position below it and the ties at it it needs.

    Ties are spread, not taken in order: over a quantized base many entries share one dequantized
    value (nf4's zero code holds several % of a layer, exactly the smallest |θ|), and taking them in
    tensor and position order would put a small budget into the first layers' first rows. Each
    tensor gets the needed ties in proportion to its own (largest remainders), at evenly spaced
    positions among them. Without ties at the k-th value: the positions of the all-at-once form."""
    kept, total = None, 0
    for score in scores.values():
        flat = _flat(score)
        total += len(flat)
        pool = flat if kept is None else torch.cat([kept, flat])
        kept = pool if len(pool) <= k else torch.topk(pool, k, largest=False, sorted=False).values
    if not 0 < k <= total:
        raise ValueError(f"cannot select {k} of {total} entries")
    kth = kept.max()
    del kept
    below, ties, devices = {}, {}, {}
    for name, score in scores.items():
        flat = _flat(score)
        below[name], ties[name] = torch.nonzero(flat < kth).squeeze(1), torch.nonzero(flat == kth).squeeze(1)
        devices[name] = score.device
    shares = _spread(k - sum(len(p) for p in below.values()), {n: len(t) for n, t in ties.items()})
    out = {}
    for name in below:
        tied, n = ties[name], shares[name]
        picked = tied[torch.linspace(0, len(tied) - 1, n).round().long()] if n else tied[:0]
        out[name] = torch.sort(torch.cat([below[name], picked])).values.to(devices[name])
    return out


def _spread(needed: int, available: dict[str, int]) -> dict[str, int]:
    """`needed` split over the names in proportion to `available`, by largest remainders (ties of
    remainders to the earlier name), none above its availability."""
    total = sum(available.values())
    exact = {n: needed * a / total if total else 0.0 for n, a in available.items()}
    shares = {n: min(int(e), available[n]) for n, e in exact.items()}
    order = sorted(available, key=lambda n: -(exact[n] - int(exact[n])))
    rest = needed - sum(shares.values())
    for name in order * 2:  # a second sweep in case a share was capped
        if rest <= 0:
            break
        if shares[name] < available[name]:
            shares[name] += 1
            rest -= 1
    return shares


def smallest_fraction(scores: dict[str, torch.Tensor], density: float, per_tensor: bool) -> dict[str, torch.Tensor]:
    """The ⌈density·n⌉ smallest scores, over all tensors together or within each tensor."""
    check_density(density)
    if per_tensor:
        return {n: smallest_k({n: s}, budget(s.numel(), density))[n] for n, s in scores.items()}
    return smallest_k(scores, budget(sum(s.numel() for s in scores.values()), density))


def budget(n: int, density: float) -> int:
    return max(1, min(n, round(n * density)))
