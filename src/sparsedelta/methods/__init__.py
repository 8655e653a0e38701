"""One small module per method; each adds its fields to DeltaConfig and chooses positions."""

from . import diff_pruning
from .baselines import MagnitudeConfig, RandomConfig
from .diff_pruning import DiffPruningConfig
from .sara import SaRAConfig

__all__ = ["DiffPruningConfig", "MagnitudeConfig", "RandomConfig", "SaRAConfig", "diff_pruning"]
