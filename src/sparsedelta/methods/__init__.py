"""The methods, one module each; every module registers its runner (see registry.py), so importing
this package makes them all available by name."""

# imported in the order the command line lists them
from . import sara  # noqa: I001
from . import sora
from .diff_pruning import runner as _diff_pruning_runner  # noqa: F401
from . import baselines, full, peft_adapters  # noqa: F401
from . import spiel
from . import diff_pruning
from .base import Budget, DeltaRunner, MethodRunner, MethodSettings
from .baselines import MagnitudeConfig, RandomConfig
from .diff_pruning import DiffPruningConfig
from .registry import make_runner, method_names, register_method, runner_class
from .sara import SaRAConfig
from .sora import SoRAConfig
from .spiel import SpIELConfig

__all__ = [
    "Budget", "DeltaRunner", "DiffPruningConfig", "MagnitudeConfig", "MethodRunner", "MethodSettings", "RandomConfig",
    "SaRAConfig", "SoRAConfig", "SpIELConfig", "diff_pruning", "make_runner", "method_names", "register_method",
    "runner_class", "sara", "sora", "spiel",
]  # fmt: skip
