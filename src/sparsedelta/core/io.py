"""Delta files: `delta.safetensors` (+ a readable `delta_config.json` beside it).

Per delta tensor `<param>.indices` (int32 below 2^31 entries) and `<param>.values`; every densely
trained tensor under its own parameter path. The safetensors metadata is self-sufficient: format
version, the method config, the base fingerprint (shape, dtype and a hash of θ at the stored
positions of each tensor, so a delta refuses to load onto another base) and a checksum of the
stored bytes (so a damaged file is refused rather than half-loaded). Writes are atomic.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from .adapters import _all_unmerged, add_delta, state_of, sync
from .card import write_card
from .config import DeltaConfig
from .encoding import decode, encode
from .remote import locate

FORMAT = "sparsedelta"
FORMAT_VERSION = 1
DELTA_FILE = "delta.safetensors"
CONFIG_FILE = "delta_config.json"
INDEX_ENCODINGS = ("int32", "elias-fano")
VALUE_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class DeltaFileError(ValueError):
    """A delta file that cannot be used: damaged, of another format, or for another base model."""


def tensor_hash(t: torch.Tensor) -> str:
    t = t.detach().contiguous().cpu()
    return hashlib.sha256(t.reshape(-1).view(torch.uint8).numpy().tobytes()).hexdigest()


def _content_hash(tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for key in sorted(tensors):
        h.update(key.encode())
        h.update(tensor_hash(tensors[key]).encode())
    return h.hexdigest()


def atomic_write(path: Path, write) -> None:
    """Write through `write(tmp_path)` and rename: readers see the old file or the new, never half."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def save(
    model: nn.Module,
    directory: str | os.PathLike,
    adapter_name: str | None = None,
    dtype: str = "float32",
    index_encoding: str = "int32",
    card: dict | None = None,
) -> Path:
    """Save one adapter (default: the active one) into `directory`; returns the delta file's path.

    dtype: the values' storage type ("float32", "float16", "bfloat16").
    index_encoding: "int32" (plain, 4 bytes a position) or "elias-fano" (about 2 + log2(n/k) bits a
    position, within about 10% of the information floor at typical densities).
    card: extra sections for the README.md model card written beside the delta (see core/card.py)."""
    state = state_of(model)
    name = adapter_name or state.active
    if name not in state.adapters:
        raise KeyError(f"no adapter {name!r} to save; this model has {sorted(state.adapters)}")
    if dtype not in VALUE_DTYPES:
        raise ValueError(f"values dtype must be one of {list(VALUE_DTYPES)}, got {dtype!r}")
    if index_encoding not in INDEX_ENCODINGS:
        raise ValueError(f"index_encoding must be one of {list(INDEX_ENCODINGS)}, got {index_encoding!r}")
    adapter = state.adapters[name]
    sync(model)
    tensors, fingerprint = {}, {}
    for path, delta in adapter.deltas.items():
        positions, base, values = delta.all_entries()
        numel = math.prod(delta.shape)
        if index_encoding == "elias-fano":
            tensors[f"{path}.indices"] = encode(positions, numel)
        else:
            tensors[f"{path}.indices"] = positions.to(torch.int32 if numel < 2**31 else torch.int64).cpu()
        tensors[f"{path}.values"] = values.to(VALUE_DTYPES[dtype]).cpu()
        fingerprint[path] = {
            "shape": list(delta.shape),
            "dtype": str(base.dtype).removeprefix("torch."),
            "entries": len(positions),
            "sha256": tensor_hash(base),
        }
    for path, param in adapter.saved.items():
        tensors[path] = param.detach().cpu().contiguous()
    metadata = {
        "format": FORMAT,
        "format_version": str(FORMAT_VERSION),
        "config": json.dumps(adapter.config.to_dict()),
        "fingerprint": json.dumps(fingerprint),
        "saved_tensors": json.dumps(sorted(adapter.saved)),
        "values_dtype": dtype,
        "index_encoding": index_encoding,
        "content_sha256": _content_hash(tensors),
    }
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    atomic_write(directory / DELTA_FILE, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))
    readable = {k: json.loads(v) if k in ("config", "fingerprint", "saved_tensors") else v for k, v in metadata.items()}
    readable["fingerprint"] = {k: {"shape": v["shape"], "entries": v["entries"]} for k, v in fingerprint.items()}
    atomic_write(directory / CONFIG_FILE, lambda tmp: tmp.write_text(json.dumps(readable, indent=2) + "\n"))
    write_card(directory, metadata, model, card)
    return directory / DELTA_FILE


def read(path: str | os.PathLike) -> tuple[dict, dict[str, torch.Tensor]]:
    """Read and verify a delta file: (metadata with parsed JSON fields, tensors)."""
    path = Path(path)
    if path.is_dir():
        path = path / DELTA_FILE
    if not path.exists():
        raise FileNotFoundError(
            f"no delta file at {path}; pass the folder written by sparsedelta.save or the .safetensors file"
        )
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, RuntimeError) as e:
        raise DeltaFileError(f"{path} cannot be read as a delta file (truncated or corrupted?): {e}") from e
    if metadata.get("format") != FORMAT:
        raise DeltaFileError(f"{path} is not a sparsedelta file (format={metadata.get('format')!r})")
    version = metadata.get("format_version")
    if version != str(FORMAT_VERSION):
        raise DeltaFileError(
            f"{path} has format version {version}, this sparsedelta reads version {FORMAT_VERSION}; "
            "upgrade sparsedelta (or re-save the delta with this version)"
        )
    try:
        meta = dict(metadata)
        for key in ("config", "fingerprint", "saved_tensors"):
            meta[key] = json.loads(metadata[key])
    except (KeyError, json.JSONDecodeError) as e:
        raise DeltaFileError(f"{path} has damaged metadata ({e}); the file cannot be trusted") from e
    missing = [
        f"{n}.{part}" for n in meta["fingerprint"] for part in ("indices", "values") if f"{n}.{part}" not in tensors
    ]
    missing += [n for n in meta["saved_tensors"] if n not in tensors]
    if missing:
        raise DeltaFileError(
            f"{path} lacks tensors {missing[:5]}{' …' if len(missing) > 5 else ''}; the file is incomplete"
        )
    if _content_hash(tensors) != metadata.get("content_sha256"):
        raise DeltaFileError(f"{path} failed its checksum: the stored tensors were changed or damaged")
    encoding = metadata.get("index_encoding", "int32")
    if encoding not in INDEX_ENCODINGS:
        raise DeltaFileError(f"{path} uses index encoding {encoding!r}; this sparsedelta reads {list(INDEX_ENCODINGS)}")
    if encoding == "elias-fano":
        for name, fp in meta["fingerprint"].items():
            tensors[f"{name}.indices"] = decode(tensors[f"{name}.indices"], math.prod(fp["shape"]), fp["entries"])
    return meta, tensors


def load(
    model: nn.Module,
    path: str | os.PathLike,
    adapter_name: str = "default",
    trainable: bool = False,
) -> nn.Module:
    """Attach a saved delta to `model` (its base) as `adapter_name` and make it active.

    Refuses, before changing anything, a file for another base: a missing tensor, another shape,
    or base values at the stored positions that differ from the ones it was trained on. `path` may
    also be a Hugging Face Hub id, "user/repo" (or "user/repo@revision"), when no such path exists."""
    meta, tensors = read(locate(path, DELTA_FILE))
    config = DeltaConfig.from_dict(meta["config"])
    params = dict(model.named_parameters(remove_duplicate=False))
    positions, values = {}, {}
    with _all_unmerged(model):
        for name, fp in meta["fingerprint"].items():
            if name not in params:
                raise DeltaFileError(
                    f"the delta has tensor {name!r}, which this model lacks; is this the base model it was trained on?"
                )
            param = params[name]
            if list(param.shape) != fp["shape"]:
                raise DeltaFileError(
                    f"shape mismatch for {name}: delta was made for {tuple(fp['shape'])}, this model has {tuple(param.shape)}; "
                    "load it onto the base model it was trained on"
                )
            idx = tensors[f"{name}.indices"].long().to(param.device)
            if len(idx) and (idx.min() < 0 or idx.max() >= param.numel()):
                raise DeltaFileError(f"positions of {name} fall outside its tensor; the file is damaged")
            if tensor_hash(param.detach().reshape(-1)[idx]) != fp["sha256"]:
                raise DeltaFileError(
                    f"base fingerprint mismatch at {name}: this model's weights at the delta's positions differ from the "
                    "base it was trained on; load it onto that base model (same checkpoint, same dtype)"
                )
            positions[name] = idx
            values[name] = tensors[f"{name}.values"]
    for name in meta["saved_tensors"]:
        if name not in params or params[name].shape != tensors[name].shape:
            found = tuple(params[name].shape) if name in params else "nothing"
            raise DeltaFileError(
                f"densely trained tensor {name} {tuple(tensors[name].shape)} has no match in this model ({found}); "
                "build the model as for training (e.g. the same num_labels)"
            )
    add_delta(model, config, positions, adapter_name, values=values, trainable=trainable)
    adapter = state_of(model).adapters[adapter_name]
    with torch.no_grad():
        for name, param in adapter.saved.items():
            param.copy_(tensors[name])
    return model
