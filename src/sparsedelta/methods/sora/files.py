"""Saving and loading an unpruned SoRA state (to resume, inspect, or pick a stage)."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from ...core.atomic import atomic_write
from ...errors import UsageError
from .config import CONFIG_FILE, FORMAT, FORMAT_VERSION, STATE_FILE, SoRAConfig
from .layer import _saved_parameters, _state, attach, layers


# -- saving and loading the unpruned state ----------------------------------------------------------
def save(model: nn.Module, directory: str | os.PathLike) -> Path:
    """Save the SoRA state (A, B, g of every layer, the densely trained tensors, the config with its
    current ξ) to `directory` for resuming or inspection; atomic writes. Returns the state file's path."""
    state = _state(model)
    found = layers(model)
    tensors = {}
    for name, layer in found.items():
        tensors[f"{name}.lora_A"] = layer.lora_A.detach().contiguous().cpu()
        tensors[f"{name}.lora_B"] = layer.lora_B.detach().contiguous().cpu()
        tensors[f"{name}.gate"] = layer.gate.detach().contiguous().cpu()
    saved = _saved_parameters(model, state.saved)
    for path, param in saved.items():
        tensors[path] = param.detach().contiguous().cpu()
    info = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "config": state.config.to_dict(),
        "layers": {n: {"rank": m.rank, "nonzero_gates": int(torch.count_nonzero(m.gate))} for n, m in found.items()},
        "saved_modules": state.saved,
        "saved_tensors": sorted(saved),
    }
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    metadata = {k: json.dumps(v) if not isinstance(v, str) else v for k, v in info.items()}
    atomic_write(directory / STATE_FILE, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))
    text = json.dumps(info, indent=2) + "\n"
    atomic_write(directory / CONFIG_FILE, lambda tmp: tmp.write_text(text))
    return directory / STATE_FILE


def _read_state(path: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    path = path / STATE_FILE if path.is_dir() else path
    if not path.exists():
        raise FileNotFoundError(f"no SoRA state at {path}; pass the folder written by sora.save")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, RuntimeError) as e:
        raise UsageError(f"{path} cannot be read as a SoRA state (truncated or corrupted?): {e}") from e
    if metadata.get("format") != FORMAT:
        raise UsageError(f"{path} is not a SoRA state written by sora.save (format={metadata.get('format')!r})")
    if metadata.get("format_version") != str(FORMAT_VERSION):
        raise UsageError(
            f"{path} has SoRA format version {metadata.get('format_version')}; this sparsedelta reads {FORMAT_VERSION}"
        )
    info = {k: json.loads(v) if k not in ("format",) else v for k, v in metadata.items()}
    return info, tensors


@torch.no_grad()
def load(model: nn.Module, directory: str | os.PathLike) -> nn.Module:
    """Attach the SoRA state saved by `save` to `model` (its plain base model) and restore A, B, g and
    the densely trained tensors; a pruned state comes back pruned (ranks as saved)."""
    info, tensors = _read_state(Path(directory))
    config = SoRAConfig.from_dict(info["config"])
    attach(model, dataclasses.replace(config, seed=0))  # initial values are replaced below: leave torch's RNG alone
    _state(model).config = config
    found = layers(model)
    expected = set(info["layers"])
    if set(found) != expected:
        extra, lacking = sorted(set(found) - expected), sorted(expected - set(found))
        raise UsageError(
            f"the saved SoRA state does not fit this model (layers only here: {extra[:3]}, only in the state: "
            f"{lacking[:3]}); load it onto the base model it was trained on"
        )
    for name, layer in found.items():
        a, b, g = (tensors[f"{name}.{part}"] for part in ("lora_A", "lora_B", "gate"))
        if a.shape[1] != layer.lora_A.shape[1] or b.shape[0] != layer.lora_B.shape[0]:
            raise UsageError(
                f"layer {name} is {tuple(layer.lora_B.shape[:1]) + tuple(layer.lora_A.shape[1:])} (out, in) here but "
                f"({b.shape[0]}, {a.shape[1]}) in the state; load it onto the base model it was trained on"
            )
        for attr, value in (("lora_A", a), ("lora_B", b), ("gate", g)):
            setattr(layer, attr, nn.Parameter(value.to(getattr(layer, attr)), requires_grad=True))
    params = dict(model.named_parameters())
    for path in info["saved_tensors"]:
        if path not in params or params[path].shape != tensors[path].shape:
            found_shape = tuple(params[path].shape) if path in params else "nothing"
            raise UsageError(
                f"densely trained tensor {path} {tuple(tensors[path].shape)} has no match in this model ({found_shape}); "
                "build the model as for training (e.g. the same num_labels)"
            )
        params[path].copy_(tensors[path])
    return model


