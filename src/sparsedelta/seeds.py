"""Every random stream of a run, derived from (seed, purpose) in one place, so that "same seed, same
run" can be audited here rather than searched for.

| purpose | where | derivation |
|---|---|---|
| data split | data.tables.stratified_split, data.text.split_units | `split_seed` (its own flag) |
| subsets (--max-*-samples) | data.tables | `split_seed` |
| a new head's initial weights | models.classifier.load_classifier | torch.manual_seed(seed) |
| diffusion: training noise and timesteps | train.tasks.diffusion | torch.manual_seed(seed) when the data loads; checkpointed |
| diffusion: held-out noise, sample grids | train.tasks.diffusion | a fixed EVAL_SEED; `seed` (the grid's start) |
| data order of epoch e | train.loop | `epoch_seed(seed, e)` |
| a method's per-step choices | methods.base.MethodRunner.rng | random.Random(seed) |
| random masks | methods.baselines.RandomConfig | `seed` field (default: the run's seed) |
| Diff Pruning's noise of step t | methods.diff_pruning | `mix(seed, tensor, t, block)` |
| SoRA's gates | methods.sora | torch.Generator(seed) |

The derivations are those of the first release, kept so that its results reproduce.
"""

from __future__ import annotations

import random

import torch


def epoch_seed(seed: int, epoch: int) -> int:
    """The seed of epoch `epoch`'s data order."""
    return seed * 100_003 + epoch


def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    return torch.Generator().manual_seed(epoch_seed(seed, epoch))


def method_rng(seed: int) -> random.Random:
    """A method's own stream for per-step choices (e.g. SaRA's penalised matrix); saved in checkpoints."""
    return random.Random(seed)


def mix(*key: int) -> int:
    """A 63-bit generator seed from a tuple of small integers (FNV-1a; stable across runs and processes)."""
    h = 1469598103934665603
    for k in key:
        h = ((h ^ (k & 0xFFFFFFFFFFFFFFFF)) * 1099511628211) & 0xFFFFFFFFFFFFFFFF
    return h >> 1
