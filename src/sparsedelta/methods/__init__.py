"""One small module per method; each adds its fields to DeltaConfig and chooses positions."""

from .baselines import MagnitudeConfig, RandomConfig
from .sara import SaRAConfig

__all__ = ["MagnitudeConfig", "RandomConfig", "SaRAConfig"]
