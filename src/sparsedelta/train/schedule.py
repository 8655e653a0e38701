"""Learning-rate schedules: linear warm-up, then cosine, linear or constant; restarted per phase."""

from __future__ import annotations

import math


def lr_factor(schedule: str, warmup: int, total: int):
    """Multiplier of the base lr at step s: (s + 1)/(warmup + 1) while warming up, then the decay."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = (step - warmup) / max(1, total - warmup)
        if schedule == "cosine":
            return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
        if schedule == "linear":
            return max(0.0, 1 - progress)
        return 1.0

    return factor


def phased_lr_factor(schedule: str, warmup_ratio: float, starts: list[int], total: int):
    """The schedule started afresh (warm-up, then decay) at each phase start, e.g. Diff Pruning's
    fixed-mask phase, which trains new tensors with a fresh optimizer."""
    bounds = [*starts, total]
    phases = [(a, lr_factor(schedule, int(warmup_ratio * (b - a)), b - a)) for a, b in zip(bounds, bounds[1:])]

    def factor(step: int) -> float:
        start, phase = next(p for p in reversed(phases) if step >= p[0])
        return phase(step - start)

    return factor
