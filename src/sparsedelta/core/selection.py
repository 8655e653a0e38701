"""Position-selection rules shared by the methods: a threshold, or an exact budget of k entries."""

from __future__ import annotations

import torch

from ..errors import UsageError


def check_density(density: float) -> None:
    if not 0 < density <= 1:
        raise UsageError(f"density must lie in (0, 1], got {density}; e.g. 0.01 trains 1% of the targeted entries")


def below(scores: dict[str, torch.Tensor], threshold: float) -> dict[str, torch.Tensor]:
    """Flat positions where score < threshold, per tensor."""
    return {name: torch.nonzero(s.reshape(-1) < threshold).squeeze(1) for name, s in scores.items()}


def smallest_k(scores: dict[str, torch.Tensor], k: int) -> dict[str, torch.Tensor]:
    """Exactly k positions with the smallest scores over all tensors together; ties are broken by
    order (tensor order, then position), so the count is exact."""
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


def smallest_fraction(scores: dict[str, torch.Tensor], density: float, per_tensor: bool) -> dict[str, torch.Tensor]:
    """The ⌈density·n⌉ smallest scores, over all tensors together or within each tensor."""
    check_density(density)
    if per_tensor:
        return {n: smallest_k({n: s}, budget(s.numel(), density))[n] for n, s in scores.items()}
    return smallest_k(scores, budget(sum(s.numel() for s in scores.values()), density))


def budget(n: int, density: float) -> int:
    return max(1, min(n, round(n * density)))
