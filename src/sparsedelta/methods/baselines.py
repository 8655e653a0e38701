"""Baseline masks at a given budget: random positions, or the largest |θ|."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..core.config import DeltaConfig, SelectionReport
from ..core.selection import smallest_fraction


@dataclass
class _BudgetConfig(DeltaConfig):
    density: float = 0.01
    per_tensor: bool = False

    def _report(self, rule: str, tensors, positions) -> tuple[dict, SelectionReport]:
        per = {n: len(p) for n, p in positions.items()}
        eligible = sum(t.numel() for t in tensors.values())
        return positions, SelectionReport(rule, sum(per.values()), eligible, per)


@dataclass
class RandomConfig(_BudgetConfig):
    """Uniformly random positions (a control for any learned or rule-based mask)."""

    method = "random"
    seed: int = 0

    def select(self, tensors):
        gen = torch.Generator().manual_seed(self.seed)
        scores = {n: torch.rand(t.numel(), generator=gen) for n, t in tensors.items()}
        return self._report(
            f"random at density {self.density}", tensors, smallest_fraction(scores, self.density, self.per_tensor)
        )


@dataclass
class MagnitudeConfig(_BudgetConfig):
    """The largest |θ| (the opposite of SaRA's rule)."""

    method = "magnitude"

    def select(self, tensors):
        scores = {n: -t.abs() for n, t in tensors.items()}
        return self._report(
            f"largest |θ| at density {self.density}", tensors, smallest_fraction(scores, self.density, self.per_tensor)
        )
