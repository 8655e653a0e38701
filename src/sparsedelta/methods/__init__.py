"""One small module per method; each adds its fields to DeltaConfig and chooses positions."""

from . import diff_pruning, sora
from .baselines import MagnitudeConfig, RandomConfig
from .diff_pruning import DiffPruningConfig
from .sara import SaRAConfig
from .sora import SoRAConfig

__all__ = ["DiffPruningConfig", "MagnitudeConfig", "RandomConfig", "SaRAConfig", "SoRAConfig", "diff_pruning", "sora"]
