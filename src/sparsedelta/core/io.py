"""Delta files: `delta.safetensors` (+ a readable `delta_config.json` beside it).

Per delta tensor `<param>.indices` (int32 below 2^31 entries, or an Elias-Fano code) and
`<param>.values`; every densely trained tensor under its own parameter path. The safetensors metadata
is self-sufficient: format version, the method config, the base fingerprint (shape, dtype and a hash
of θ at the stored positions of each tensor, so a delta refuses to load onto another base), the list
of densely trained tensors, and a checksum over all metadata and every tensor's name, dtype, shape
and bytes. Writes are atomic. Reading trusts nothing in the file: `fileformat` checks every field and
tensor, and `load` checks the file against the model, before anything is attached
(docs/file-format.md).
"""

from __future__ import annotations

import json
import math
import os
import stat
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from ..errors import UnknownAdapterError, UsageError
from . import quantized
from .adapters import add_delta, state_of, sync
from .atomic import atomic_write
from .card import write_card
from .encoding import encode
from .fileformat import (
    CHECKSUM_KEY,
    FILE_DTYPES,
    FORMAT,
    FORMAT_VERSION,
    INDEX_ENCODINGS,
    VALUE_DTYPES,
    DeltaFileError,
    Layout,
    check_finite,
    checksum,
    parse_layout,
    positions_of,
    tensor_hash,
    verify_checksum,
)
from .remote import locate
from .targeting import find_targets

__all__ = ["CONFIG_FILE", "DELTA_FILE", "FORMAT", "FORMAT_VERSION", "DeltaFileError", "load", "read", "save"]
DELTA_FILE = "delta.safetensors"
CONFIG_FILE = "delta_config.json"


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
        raise UnknownAdapterError(f"no adapter {name!r} to save; this model has {sorted(state.adapters)}")
    if dtype not in VALUE_DTYPES:
        raise UsageError(f"values dtype must be one of {list(VALUE_DTYPES)}, got {dtype!r}")
    if index_encoding not in INDEX_ENCODINGS:
        raise UsageError(f"index_encoding must be one of {list(INDEX_ENCODINGS)}, got {index_encoding!r}")
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
            "dtype": delta.quantized or str(base.dtype).removeprefix("torch."),  # a quantized base: its scheme
            "entries": len(positions),
            "sha256": tensor_hash(quantized.fingerprint_values(delta.layer, base) if delta.quantized else base),
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
    }
    metadata[CHECKSUM_KEY] = checksum(metadata, tensors)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    atomic_write(directory / DELTA_FILE, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))
    readable = {k: json.loads(v) if k in ("config", "fingerprint", "saved_tensors") else v for k, v in metadata.items()}
    readable["fingerprint"] = {k: {"shape": v["shape"], "entries": v["entries"]} for k, v in fingerprint.items()}
    atomic_write(directory / CONFIG_FILE, lambda tmp: tmp.write_text(json.dumps(readable, indent=2) + "\n"))
    write_card(directory, metadata, (directory / DELTA_FILE).stat().st_size, model, card)
    return directory / DELTA_FILE


class _DeltaFile:
    """An open delta file whose metadata and header are checked; tensors are read on request."""

    def __init__(self, path: str | os.PathLike):
        path = Path(path)
        if path.is_dir():
            path = path / DELTA_FILE
        if not path.exists():
            raise FileNotFoundError(
                f"no delta file at {path}; pass the folder written by sparsedelta.save or the .safetensors file"
            )
        if not stat.S_ISREG(path.stat().st_mode):
            raise DeltaFileError(f"{path} is not a regular file (a directory or a device?); pass a delta file")
        self.source = str(path)
        self._handle = self._guard(lambda: safe_open(self.source, framework="pt"))
        try:
            header = self._guard(self._header)
            self.layout: Layout = parse_layout(self._guard(self._handle.metadata), header, self.source)
        except BaseException:
            self.close()
            raise

    def _header(self) -> dict[str, tuple[str, list[int]]]:
        """Each stored tensor's dtype and shape, without reading it."""
        slices = {name: self._handle.get_slice(name) for name in self._handle.keys()}
        return {name: (s.get_dtype(), s.get_shape()) for name, s in slices.items()}

    def _guard(self, read):
        try:
            return read()
        except (SafetensorError, OSError, RuntimeError, ValueError, TypeError, OverflowError) as e:
            raise DeltaFileError(f"{self.source} cannot be read as a delta file (truncated or corrupted?): {e}") from e

    def tensors(self, allow_nonfinite: bool = False) -> dict[str, torch.Tensor]:
        """Every tensor, verified: checksum, positions (decoded to sorted, distinct int64 in range),
        and finite values unless allowed otherwise."""
        layout, source = self.layout, self.source
        stored = {name: self._guard(lambda name=name: self._handle.get_tensor(name)) for name in layout.header}
        verify_checksum(layout, stored, source)
        out = {}
        for name in layout.fingerprint:
            out[f"{name}.indices"] = positions_of(layout, name, stored.pop(f"{name}.indices"), source)
            out[f"{name}.values"] = stored.pop(f"{name}.values")
        out.update(stored)  # the densely trained tensors
        if not allow_nonfinite:
            for name, t in out.items():
                if t.is_floating_point():
                    check_finite(name, t, source)
        return out

    def close(self) -> None:
        self._handle.__exit__(None, None, None)

    def __enter__(self) -> _DeltaFile:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def read(path: str | os.PathLike, allow_nonfinite: bool = False) -> tuple[dict, dict[str, torch.Tensor]]:
    """Read and verify a delta file.

    Args:
        path: the delta file, or the folder `save` wrote.
        allow_nonfinite: accept NaN or infinite values (refused by default).
    Returns:
        (metadata with its JSON fields parsed, tensors): `<param>.indices` as sorted int64 positions
        whatever the file's index encoding, `<param>.values` as stored, dense tensors by parameter path.
    Raises:
        DeltaFileError: for any file that is not a whole, consistent delta file."""
    with _DeltaFile(path) as file:
        return file.layout.parsed_metadata(), file.tensors(allow_nonfinite)


def read_metadata(path: str | os.PathLike) -> dict:
    """A delta file's checked metadata, as `read` returns it, without reading a tensor."""
    with _DeltaFile(path) as file:
        return file.layout.parsed_metadata()


def verify_base(
    model: nn.Module, path: str | os.PathLike, adapter_name: str | None = None, allow_nonfinite: bool = False
) -> tuple[Layout, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Read a delta file and check it against `model` as its base, changing nothing.

    Checks the file (see `read`), then the file against the model (each tensor's name, shape and
    dtype; that the config targets the delta's tensors and names exactly the densely trained tensors
    the file holds; the base values at the stored positions, even while another delta is merged).

    Args:
        model: the base model the delta was trained on.
        path: the delta file, or the folder `save` wrote.
        adapter_name: the name it would be attached under (checked to be free), or None.
        allow_nonfinite: accept NaN or infinite values (refused by default, as PEFT's safe_merge).
    Returns:
        (the file's checked layout, its tensors, the positions per tensor on that tensor's device).
    Raises:
        DeltaFileError: a damaged or inconsistent file, or one for another base model."""
    with _DeltaFile(path) as file:
        layout, source = file.layout, file.source
        targets = _check_model(model, layout, adapter_name, source)  # before reading any tensor
        tensors = file.tensors(allow_nonfinite)
    positions = {}
    for name, param in targets.items():
        idx = tensors[f"{name}.indices"].to(param.device)
        if tensor_hash(_base_values(model, name, param, idx)) != layout.fingerprint[name].sha256:
            raise DeltaFileError(
                f"base fingerprint mismatch at {name}: this model's weights at the delta's positions differ from the "
                "base it was trained on; load it onto that base model (same checkpoint, same dtype)"
            )
        positions[name] = idx
    return layout, tensors, positions


def load(
    model: nn.Module,
    path: str | os.PathLike,
    adapter_name: str = "default",
    trainable: bool = False,
    allow_nonfinite: bool = False,
) -> nn.Module:
    """Attach a saved delta to `model` (its base) as `adapter_name` and make it active.

    Everything is checked before the model is touched (`verify_base`); a refused load leaves the
    model as it was. `path` may also be a Hugging Face Hub id, "user/repo" (or "user/repo@revision"),
    when no such path exists.

    Args:
        model: the base model the delta was trained on (another adapter may be attached and active).
        path: the delta file, or the folder `save` wrote.
        adapter_name: the name to attach it under.
        trainable: keep training it (its values and dense tensors get requires_grad).
        allow_nonfinite: accept NaN or infinite values (refused by default, as PEFT's safe_merge).
    Returns:
        The model, with the delta attached and active.
    Raises:
        DeltaFileError: a damaged or inconsistent file, or one for another base model."""
    layout, tensors, positions = verify_base(model, locate(path, DELTA_FILE), adapter_name, allow_nonfinite)
    values = {name: tensors[f"{name}.values"] for name in positions}
    add_delta(model, layout.config, positions, adapter_name, values=values, trainable=trainable)
    adapter = state_of(model).adapters[adapter_name]
    with torch.no_grad():
        for name in layout.saved:  # the file's own list, which _check_model matched with the config
            adapter.saved[name].copy_(tensors[name])
    return model


def _check_model(model: nn.Module, layout: Layout, adapter_name: str | None, source: str) -> dict[str, nn.Parameter]:
    """Everything `add_delta` and the head's copy need from the model, checked against the file
    without changing the model. Returns the parameters that get entries, by path."""
    if adapter_name is not None and ("." in adapter_name or not adapter_name):
        raise UsageError(f"adapter name {adapter_name!r} must be non-empty and contain no '.'")
    state = getattr(model, "_sparsedelta", None)
    if state is not None and adapter_name is not None and adapter_name in state.adapters:
        raise UsageError(
            f"adapter {adapter_name!r} exists already; pick another name or call sparsedelta.delete_adapter first"
        )
    params = dict(model.named_parameters(remove_duplicate=False))
    for name, fp in layout.fingerprint.items():
        if name not in params:
            raise DeltaFileError(
                f"the delta has tensor {name!r}, which this model lacks; is this the base model it was trained on?"
            )
        param = params[name]
        shape, dtype = quantized.logical_shape(param), quantized.dtype_name(param)
        if shape != fp.shape:
            raise DeltaFileError(
                f"shape mismatch for {name}: delta was made for {fp.shape}, this model has {shape}; "
                "load it onto the base model it was trained on"
            )
        if dtype != fp.dtype:
            raise DeltaFileError(f"dtype mismatch for {name}: the delta was made on a {fp.dtype} base, this model holds "
                                 f"{dtype}; {_dtype_fix(fp.dtype)}")  # fmt: skip
        if not param.is_contiguous():
            raise UsageError(f"{name} is not contiguous; call .contiguous() on the parameter before loading a delta")
        if state is not None and name in state.base_saved:
            raise UsageError(
                f"{name} is trained densely by another adapter on this model (its modules_to_save); a delta cannot "
                "go on it as well: load onto a model without that adapter"
            )
    for name in layout.saved:
        dtype, shape = layout.header[name]
        param = params.get(name)
        if param is None or list(param.shape) != list(shape):
            found = tuple(param.shape) if param is not None else "nothing"
            raise DeltaFileError(
                f"densely trained tensor {name} {tuple(shape)} has no match in this model ({found}); "
                "build the model as for training (e.g. the same num_labels)"
            )
        if FILE_DTYPES[dtype] != param.dtype:
            raise DeltaFileError(
                f"densely trained tensor {name} is stored as {FILE_DTYPES[dtype]}, this model's is {param.dtype}; "
                "load the base in the dtype it was trained in"
            )
    try:
        found, saved_modules = find_targets(model, layout.config)
    except ValueError as e:
        raise DeltaFileError(f"{source}: its config does not fit this model: {e}") from None
    for name in layout.fingerprint:
        if name not in found:
            raise DeltaFileError(
                f"{source}: tensor {name} is not one its config targets in this model "
                f"(target_modules={layout.config.target_modules!r}, parameter_kinds={layout.config.parameter_kinds}); "
                "the file is inconsistent"
            )
    expected = sorted(
        f"{m}.{p}" for m in saved_modules for p, _ in model.get_submodule(m).named_parameters(recurse=False)
    )
    if expected != sorted(layout.saved):
        raise DeltaFileError(
            f"{source} holds the densely trained tensors {sorted(layout.saved)}, but its config's "
            f"modules_to_save={layout.config.modules_to_save!r} names {expected} in this model; the file is inconsistent"
        )
    targets = {n: params[n] for n, fp in layout.fingerprint.items() if fp.entries}
    if not targets:
        raise DeltaFileError(f"{source} holds no delta entries: nothing to load")
    return targets


def _dtype_fix(dtype: str) -> str:
    """How to load a base in the storage a delta was made on."""
    if dtype in ("int8", "nf4", "fp4"):
        scheme = "int8" if dtype == "int8" else "4bit"
        return (f"quantize the base as it was trained ({dtype}: --base-quantization {scheme}, or in Python "
                f"sparsedelta.quantize(model, {scheme!r}))")  # fmt: skip
    return f"load the base in {dtype} (e.g. from_pretrained(..., torch_dtype=torch.{dtype})), as it was trained"


def _base_values(model: nn.Module, name: str, param: nn.Parameter, idx: torch.Tensor) -> torch.Tensor:
    """θ at `idx` without unmerging anything: where the active adapter is merged, its stored base
    values stand in for the weight's. A quantized weight: its dequantized θ (never merged)."""
    if quantized.is_quantized_param(param):  # θ there and the layer's scales (quantized.fingerprint_values)
        layer = model.get_submodule(name.rpartition(".")[0])
        return quantized.fingerprint_values(layer, quantized.dequantize(layer).reshape(-1)[idx.to(param.device)])
    values = param.detach().reshape(-1)[idx]
    state = getattr(model, "_sparsedelta", None)
    if state is None or not state.merged or state.active is None:
        return values
    delta = state.adapters[state.active].deltas.get(name)
    if delta is None or not delta.num_entries:
        return values
    merged, base, _ = delta.all_entries()
    at = torch.searchsorted(merged, idx).clamp_(max=len(merged) - 1)
    hit = merged[at] == idx
    values[hit] = base[at[hit]]
    return values
