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
    config = _json_object(config_file.read_text(errors="replace"), config_file)
    try:
        with safe_open(str(weights_file), framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {k.removeprefix(PREFIX): f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError) as e:
        raise UsageError(f"{weights_file} cannot be read (truncated or corrupted?): {e}") from e
    ours = _json_object(metadata[META_KEY], f"{weights_file}'s {META_KEY!r} metadata") if META_KEY in metadata else {}
    return config, tensors, _checked_export_metadata(ours, weights_file)


def _json_object(text: str, source) -> dict:
    try:
        value = json.loads(text)
    except (ValueError, RecursionError) as e:
        raise UsageError(f"{source} is not valid JSON ({str(e)[:200]}); the adapter is damaged") from None
    if not isinstance(value, dict):
        raise UsageError(f"{source} holds a JSON {type(value).__name__}, not an object; the adapter is damaged")
    return value


def _checked_export_metadata(ours: dict, source) -> dict:
    """Our export's notes (entries per module before padding, value dtype, index encoding, the delta's
    config), refused unless each has the type the import relies on."""
    entries = ours.get("entries", {})
    fine = (
        isinstance(entries, dict)
        and all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in entries.values())
        and all(isinstance(ours.get(k, ""), str) for k in ("values_dtype", "index_encoding"))
        and isinstance(ours.get("config", {}), dict)
    )
    if not fine:
        raise UsageError(f"{source}: its {META_KEY!r} metadata is malformed; the adapter is damaged")
    return ours


def write_adapter(directory: str | Path, config: dict, tensors: dict[str, torch.Tensor], ours: dict) -> Path:
    """Write a PEFT adapter folder (atomically, file by file); returns the folder."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    stored = {PREFIX + k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    metadata = {"format": "pt", META_KEY: json.dumps(ours)}
    atomic_write(directory / WEIGHTS_NAME, lambda tmp: save_file(stored, str(tmp), metadata=metadata))
    atomic_write(directory / CONFIG_NAME, lambda tmp: tmp.write_text(json.dumps(config, indent=2) + "\n"))
    return directory
