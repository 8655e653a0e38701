"""PEFT's adapter folder, read and written without PEFT: `adapter_config.json` and
`adapter_model.safetensors`, whose keys are the model's module paths under "base_model.model."
(a tuner's tensors end in its own names, e.g. `.shira_weight`; a `modules_to_save` module's tensors
are stored under its plain parameter paths).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from ..core.atomic import atomic_write
from ..errors import UsageError

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."
META_KEY = "sparsedelta"  # safetensors metadata our export adds; PEFT ignores it


def read_adapter(directory: str | Path) -> tuple[dict, dict[str, torch.Tensor], dict]:
    """(adapter config, tensors by path without PEFT's prefix, our export's metadata or {})."""
    directory = Path(directory)
    config_file, weights_file = directory / CONFIG_NAME, directory / WEIGHTS_NAME
    if not config_file.is_file():
        raise UsageError(f"{directory} is not a PEFT adapter folder: it has no {CONFIG_NAME}")
    if not weights_file.is_file():
        legacy = " (it has adapter_model.bin: re-save it with safe_serialization=True)"
        raise UsageError(
            f"{directory} has no {WEIGHTS_NAME}{legacy if (directory / 'adapter_model.bin').exists() else ''}"
        )
    config = json.loads(config_file.read_text())
    try:
        with safe_open(str(weights_file), framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {k.removeprefix(PREFIX): f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError) as e:
        raise UsageError(f"{weights_file} cannot be read (truncated or corrupted?): {e}") from e
    ours = json.loads(metadata[META_KEY]) if META_KEY in metadata else {}
    return config, tensors, ours


def write_adapter(directory: str | Path, config: dict, tensors: dict[str, torch.Tensor], ours: dict) -> Path:
    """Write a PEFT adapter folder (atomically, file by file); returns the folder."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    stored = {PREFIX + k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    metadata = {"format": "pt", META_KEY: json.dumps(ours)}
    atomic_write(directory / WEIGHTS_NAME, lambda tmp: save_file(stored, str(tmp), metadata=metadata))
    atomic_write(directory / CONFIG_NAME, lambda tmp: tmp.write_text(json.dumps(config, indent=2) + "\n"))
    return directory
