"""SpIEL's settings and its schedule: when positions are re-chosen and what fraction of them.

The official code (AlanAnsell/peft, `tuners/sft/trainer.py`, `SftSelector`) counts completed
optimizer steps t = 1, 2, ... and re-selects at t = A, R + A, 2R + A, ... (A the accumulation steps,
R the reselection interval) while t ≤ the selection duration; the fraction of each tensor's entries
replaced at t is

    linear: p(t) = p₀ · (1 − t / T)          cosine: p(t) = p₀ · (1 + cos(π t / T)) / 2

with T = selection_duration · total steps, and, under its linear policy, p = 1 at the first
re-selection (t = A): every randomly placed initial entry is re-chosen by its accumulated gradient.
Here `first_rate` (default 1, the official code's) applies to the first re-selection under either
policy (the official cosine policy uses the formula there; one rule is simpler to state), and each
window accumulates exactly A steps (the official code opens it one step before t = mR, so it sums
A + 1 steps after the first).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from ...core.config import DeltaConfig, SelectionReport
from ...core.selection import smallest_fraction
from ...errors import UsageError

INITS = ("random", "small", "large")


@dataclass
class SpIELConfig(DeltaConfig):
    """SpIEL (Ansell et al. 2024, arXiv 2401.16405): k entries whose positions move during training.
    Targeting fields: see DeltaConfig. Defaults are the official SftConfig's."""

    method = "spiel"
    density: float = field(default=0.01, metadata={"help": "the fraction of the targeted entries trained (k stays fixed)"})  # fmt: skip
    per_tensor: bool = field(default=False, metadata={"help": "the initial budget within each tensor, not over all"})  # fmt: skip
    init: str = field(default="random", metadata={
        "help": "initial positions: 'random' (official), 'small' (smallest |θ|, SaRA's) or 'large' (largest |θ|); "
                "with first_rate=1 the first re-selection replaces them all"})  # fmt: skip
    seed: int = field(default=0, metadata={"help": "seed of random initial positions (default: the run's seed)"})
    reselection_steps: int = field(default=20, metadata={
        "help": "R: optimizer steps between re-selections (official SftConfig 20, its scripts 100)"})  # fmt: skip
    accumulation_steps: int = field(default=5, metadata={
        "help": "A: steps whose gradients are summed at the candidate positions before each re-selection (< R)"})  # fmt: skip
    initial_rate: float = field(default=0.2, metadata={"help": "p₀: the fraction replaced at t = 0 of the decay"})  # fmt: skip
    first_rate: float = field(default=1.0, metadata={
        "help": "the fraction replaced at the first re-selection (t = A; official: 1, every initial entry)"})  # fmt: skip
    rate_policy: str = field(default="linear", metadata={"help": "decay of the fraction: 'linear' or 'cosine'"})
    selection_duration: float = field(default=1.0, metadata={
        "help": "the fraction of training during which positions move (the decay reaches 0 there)"})  # fmt: skip
    candidates_per_slot: int = field(default=5, metadata={
        "help": "candidate positions scored per entry to replace: the largest |gradient| of the window's first step"})  # fmt: skip
    grown_state: str = field(default="seeded", metadata={
        "help": "AdamW moments of a grown entry: 'seeded' from its gradients in the window (official code) or 'zero'"})  # fmt: skip

    def __post_init__(self):
        super().__post_init__()
        if not 0 < self.density <= 1:
            raise UsageError(f"density must lie in (0, 1], got {self.density}")
        checks = [
            (self.init in INITS, f"init must be one of {list(INITS)}, got {self.init!r}"),
            (self.reselection_steps >= 2, f"reselection_steps must be >= 2, got {self.reselection_steps}"),
            (1 <= self.accumulation_steps < self.reselection_steps,
             f"accumulation_steps must lie in [1, reselection_steps={self.reselection_steps}), got {self.accumulation_steps}"),
            (0 <= self.initial_rate <= 1, f"initial_rate must lie in [0, 1], got {self.initial_rate}"),
            (0 <= self.first_rate <= 1, f"first_rate must lie in [0, 1], got {self.first_rate}"),
            (self.rate_policy in ("linear", "cosine"), f"rate_policy must be 'linear' or 'cosine', got {self.rate_policy!r}"),
            (0 < self.selection_duration <= 1, f"selection_duration must lie in (0, 1], got {self.selection_duration}"),
            (self.candidates_per_slot >= 1, f"candidates_per_slot must be >= 1, got {self.candidates_per_slot}"),
            (self.grown_state in ("seeded", "zero"), f"grown_state must be 'seeded' or 'zero', got {self.grown_state!r}"),
        ]  # fmt: skip
        for ok, message in checks:
            if not ok:
                raise UsageError(message)

    def select(self, tensors):
        if self.init == "random":
            gen = torch.Generator().manual_seed(self.seed)
            scores = {n: torch.rand(t.numel(), generator=gen) for n, t in tensors.items()}
        else:
            sign = 1 if self.init == "small" else -1
            scores = {n: sign * t.abs() for n, t in tensors.items()}
        positions = smallest_fraction(scores, self.density, self.per_tensor)
        per = {n: len(p) for n, p in positions.items()}
        eligible = sum(t.numel() for t in tensors.values())
        rule = f"SpIEL: {self.init} initial positions at density {self.density}, moving every {self.reselection_steps} steps"
        return positions, SelectionReport(rule, sum(per.values()), eligible, per)

    # -- the schedule ------------------------------------------------------------------------------
    def horizon(self, total_steps: int) -> float:
        """T: the step at which the replaced fraction reaches 0 and positions stop moving."""
        return self.selection_duration * total_steps

    def selection_after(self, step: int) -> int:
        """The first re-selection step t = mR + A (m ≥ 0) strictly after `step`."""
        if step < self.accumulation_steps:
            return self.accumulation_steps
        return ((step - self.accumulation_steps) // self.reselection_steps + 1) * self.reselection_steps + self.accumulation_steps

    def rate(self, step: int, total_steps: int) -> float:
        """The fraction of each tensor's entries replaced at re-selection step `step`."""
        if step <= self.accumulation_steps:
            return self.first_rate
        t = min(step / self.horizon(total_steps), 1.0)
        if self.rate_policy == "linear":
            return self.initial_rate * (1 - t)
        return self.initial_rate * (1 + math.cos(math.pi * t)) / 2


def replacements(k: int, rate: float) -> int:
    """Entries of a tensor holding k replaced at `rate` (rounded down, as the official code)."""
    return int(k * rate)
