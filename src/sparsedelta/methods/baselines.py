"""Baseline masks at a given budget: random positions, or the largest |θ|."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ..core.config import DeltaConfig, SelectionReport
from ..core.selection import scores_of, smallest_fraction
from ..core.targeting import find_targets
from ..errors import UsageError
from .base import DeltaRunner, MethodSettings
from .registry import register_method
from .sara import DEFAULT_THRESHOLD, SaRAConfig, SaRARunner


@dataclass
class _BudgetConfig(DeltaConfig):
    density: float = field(default=0.01, metadata={"help": "the fraction of the targeted entries trained"})
    per_tensor: bool = field(default=False, metadata={"help": "the budget within each tensor, not over all"})

    def _report(self, rule: str, tensors, positions) -> tuple[dict, SelectionReport]:
        per = {n: len(p) for n, p in positions.items()}
        eligible = sum(t.numel() for t in tensors.values())
        return positions, SelectionReport(rule, sum(per.values()), eligible, per)


@dataclass
class RandomConfig(_BudgetConfig):
    """Uniformly random positions (a control for any learned or rule-based mask)."""

    method = "random"
    seed: int = field(default=0, metadata={"help": "seed of the positions (default: the run's seed)"})

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
        scores = scores_of(tensors, lambda t: -t.abs())
        return self._report(
            f"largest |θ| at density {self.density}", tensors, smallest_fraction(scores, self.density, self.per_tensor)
        )


# -- runners: SaRA's budget, other positions ----------------------------------------------------------
class _BaselineRunner(DeltaRunner):
    """Positions at SaRA's budget: the given density, or the density SaRA's threshold would select on
    the same targets; SaRA's learning rates."""

    lrs = SaRARunner.lrs

    def default_lr(self, task):
        return sara_lr(self.settings, task)

    def budget_fields(self, model, targeting):
        return {"density": sara_density(self.settings, model, targeting)}


@register_method
class RandomRunner(_BaselineRunner):
    name = "random"
    summary = "baseline: uniformly random positions at SaRA's budget"
    config_class = RandomConfig

    def budget_fields(self, model, targeting):
        return {**super().budget_fields(model, targeting), "seed": self.settings.seed}  # --option seed=N overrides


@register_method
class MagnitudeRunner(_BaselineRunner):
    name = "magnitude"
    summary = "baseline: the largest |θ| at SaRA's budget (the opposite of SaRA's rule)"
    config_class = MagnitudeConfig


def sara_lr(settings: MethodSettings, task: str) -> float:
    """SaRA's learning rate for the same budget flags (its rule 1e-3·exp(−350·T), or its per-task rate)."""
    if task in SaRARunner.lrs:
        return SaRARunner.lrs[task]
    return SaRAConfig(threshold=settings.threshold, density=settings.density).default_lr


def sara_density(settings: MethodSettings, model: nn.Module, targeting: dict) -> float:
    """--density, or the density SaRA's --threshold (default 1e-3) selects on the same targets."""
    if settings.density is not None:
        return settings.density
    threshold = settings.threshold if settings.threshold is not None else DEFAULT_THRESHOLD
    return density_below(model, targeting, threshold)


def density_below(model: nn.Module, targeting: dict, threshold: float) -> float:
    """The fraction of the targeted entries with |θ| < threshold."""
    targets, _ = find_targets(model, DeltaConfig(**targeting))
    below = sum(int((t.param.detach().abs() < threshold).sum()) for t in targets.values())
    eligible = sum(t.param.numel() for t in targets.values())
    if below == 0:
        raise UsageError(f"--threshold {threshold:g} selects no entry; raise it or pass --density")
    return below / eligible
