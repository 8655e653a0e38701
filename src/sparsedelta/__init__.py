"""sparsedelta: selective fine-tuning that stores each task as a sparse delta over a frozen model."""

from .core import algebra
from .core.adapters import (
    add_delta,
    count_parameters,
    delete_adapter,
    disabled,
    merge,
    merge_and_unload,
    print_trainable_parameters,
    set_adapter,
    state_of,
    sync,
    trainable_parameters,
    unload,
    unmerge,
)
from .core.compose import ComposedConfig, compose
from .core.config import DeltaConfig, SelectionReport
from .core.delta import SparseDelta
from .core.float_merge import merge_into_float_base
from .core.io import DeltaFileError, load, read, save
from .core.mixed import BASE, mixed_batch
from .core.quantized import dequantize, dequantize_model, quantize
from .interop import export_shira, import_peft
from .methods import (
    DiffPruningConfig,
    MagnitudeConfig,
    RandomConfig,
    SaRAConfig,
    SoRAConfig,
    SpIELConfig,
    diff_pruning,
    sora,
    spiel,
)

prepare = add_delta  # prepare(model, config): select positions by the config's rule and attach

__all__ = [
    "BASE",
    "ComposedConfig",
    "DeltaConfig",
    "DeltaFileError",
    "DiffPruningConfig",
    "MagnitudeConfig",
    "RandomConfig",
    "SaRAConfig",
    "SelectionReport",
    "SoRAConfig",
    "SparseDelta",
    "SpIELConfig",
    "add_delta",
    "algebra",
    "compose",
    "count_parameters",
    "delete_adapter",
    "dequantize",
    "dequantize_model",
    "diff_pruning",
    "disabled",
    "export_shira",
    "import_peft",
    "load",
    "merge",
    "merge_and_unload",
    "merge_into_float_base",
    "mixed_batch",
    "prepare",
    "quantize",
    "print_trainable_parameters",
    "read",
    "save",
    "set_adapter",
    "sora",
    "spiel",
    "state_of",
    "sync",
    "trainable_parameters",
    "unload",
    "unmerge",
]
__version__ = "0.1.0"
