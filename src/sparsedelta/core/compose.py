"""`compose`: several delta files of one base model -> one ordinary delta file (algebra.py's `combine`).

Every input is read and checked against the base model (the fingerprint check `load` does) and
against the others (the same tensors, shapes and densely saved tensors) before anything is written.
The result is attached to the base as a temporary adapter, saved by `save` (so it carries the base
fingerprint, checksum and format like any delta), and detached again: the base model is left as it
was, bit for bit, with its adapters and `requires_grad` flags.

Densely saved tensors (`modules_to_save`, e.g. a classifier head) are whole weights, not
differences, so the delta algebra does not apply to them. By default (`heads="average"`) the result
holds their weighted average Σ wᵢ·hᵢ / Σ wᵢ, which needs the same tensors and shapes in every input
and positive weights (a negated task's head has no meaning); `heads=i` takes input i's tensors
as they are and ignores the others'.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..errors import UsageError
from .adapters import add_delta, delete_adapter, set_adapter, state_of, unload
from .algebra import Delta, Entries, check_options, combine
from .config import PARAMETER_KINDS, DeltaConfig
from .io import DeltaFileError, read_metadata, save, verify_base


@dataclass
class ComposedConfig(DeltaConfig):
    """How a composed delta was made (recorded in its file; targeting names its tensors exactly).

    inputs: the input paths as given; input_sha256: their content checksums (which identify them
    wherever they move); input_methods: their methods; the other fields are `compose`'s arguments."""

    method = "composed"
    how: str = "sum"
    inputs: list[str] = field(default_factory=list)
    input_sha256: list[str] = field(default_factory=list)
    input_methods: list[str] = field(default_factory=list)
    weights: list[float] = field(default_factory=list)
    density: float | None = None
    k: int | None = None
    drop: float | None = None
    seed: int | None = None
    per_tensor: bool = False
    heads: str | int = "average"


def compose(
    base_model: nn.Module,
    paths: Sequence[str | os.PathLike],
    output: str | os.PathLike,
    weights: Sequence[float] | None = None,
    how: str = "sum",
    density: float | None = None,
    k: int | None = None,
    drop: float | None = None,
    seed: int = 0,
    per_tensor: bool = False,
    heads: str | int = "average",
    dtype: str = "float32",
    index_encoding: str = "int32",
) -> Path:
    """Compose delta files of `base_model` into one delta file in the folder `output`.

    Args:
        base_model: the base every input was trained on (checked by fingerprint); left unchanged.
        paths: delta folders, run folders or delta files.
        output: the folder to write (`delta.safetensors` + `delta_config.json`).
        weights: wᵢ per input (default 1 each).
        how: "sum", "mean", "ties", "dare" or "magnitude" (see `algebra.combine`).
        density, k, per_tensor: the budget of "ties" (each input trimmed) and "magnitude" (the sum
            trimmed): a fraction of the targeted entries, or a count; global unless per_tensor.
        drop, seed: DARE's drop probability and seed.
        heads: "average" or an input's index: what the densely saved tensors become (module doc).
        dtype, index_encoding: storage, as in `sparsedelta.save`.

    Returns:
        The path of the written delta file.

    Raises:
        DeltaFileError: an input is damaged, of another base, or unlike the others.
        ValueError: options that do not fit together. Nothing is written in either case.

    Example:
        compose(base, ["runs/a", "runs/b"], "merged/", how="ties", density=0.005)
        sparsedelta.load(base, "merged/")"""
    paths = list(paths)
    check_options(how, density, k, drop)
    if not paths:
        raise UsageError("nothing to compose: pass at least one delta")
    if weights is not None and len(weights) != len(paths):
        raise UsageError(f"{len(weights)} weights for {len(paths)} deltas; give one weight per delta")
    weights = [1.0] * len(paths) if weights is None else [float(w) for w in weights]
    metas = [read_metadata(p) for p in paths]
    _check_alike(paths, metas)  # from the headers: unlike inputs are refused before any tensor is read
    inputs, deltas = [], []
    for path in paths:
        try:
            layout, tensors, positions = verify_base(base_model, path)  # each file's tensors read once
        except DeltaFileError as e:
            raise DeltaFileError(f"{path}: {e}") from e
        inputs.append((layout.parsed_metadata(), tensors))
        deltas.append({n: Entries(p, tensors[f"{n}.values"].to(p.device, torch.float64)) for n, p in positions.items()})
    dense = _dense_tensors(paths, inputs, weights, heads)
    numels = {n: math.prod(fp["shape"]) for n, fp in inputs[0][0]["fingerprint"].items()}
    result = combine(deltas, how, weights, numels, density, k, drop, seed, per_tensor)
    result = {n: e for n, e in result.items() if len(e.positions)}
    if not result:
        raise UsageError(
            f"composing with how={how!r} left no entry at all (e.g. the deltas cancel out, or the budget is 0); "
            "nothing was written"
        )
    config = ComposedConfig(
        target_modules=sorted({n.rpartition(".")[0] for n in result}),
        parameter_kinds=PARAMETER_KINDS,
        modules_to_save=sorted({n.rpartition(".")[0] for n in dense}) or None,
        how=how,
        inputs=[str(p) for p in paths],
        input_sha256=[meta["content_sha256"] for meta, _ in inputs],
        input_methods=[meta["config"].get("method", "custom") for meta, _ in inputs],
        weights=weights,
        density=density,
        k=k,
        drop=drop,
        seed=seed if how == "dare" else None,
        per_tensor=per_tensor,
        heads=heads,
    )
    with _attached(base_model, config, result, dense) as name:
        return save(base_model, output, name, dtype=dtype, index_encoding=index_encoding)


def _check_alike(paths: list, metas: list[dict]) -> None:
    """The inputs must cover the same tensors, of the same shapes and dtypes."""
    first, reference = paths[0], metas[0]["fingerprint"]
    for path, meta in zip(paths[1:], metas[1:], strict=True):
        fingerprint = meta["fingerprint"]
        for name in reference.keys() ^ fingerprint.keys():
            has, lacks = (first, path) if name in reference else (path, first)
            raise DeltaFileError(
                f"{has} has a delta for {name} and {lacks} has none: compose deltas that target the same tensors "
                "(the same target_modules, exclude_modules and parameter_kinds on the same base)"
            )
        for name, fp in fingerprint.items():
            ref = reference[name]
            if _storage(fp["dtype"]) != _storage(ref["dtype"]):
                raise DeltaFileError(
                    f"{first} was trained over {_storage(ref['dtype'])} base and {path} over {_storage(fp['dtype'])} "
                    f"base ({name} is {ref['dtype']} in one, {fp['dtype']} in the other): a delta belongs to the base "
                    "it was trained over; compose deltas trained over the same base, quantized the same way "
                    "(the same --base-quantization, or none)"
                )
            if (fp["shape"], fp["dtype"]) != (ref["shape"], ref["dtype"]):
                raise DeltaFileError(
                    f"{name} is {ref['dtype']} {tuple(ref['shape'])} in {first} but {fp['dtype']} {tuple(fp['shape'])} "
                    f"in {path}: these deltas belong to different base models; compose deltas of one base"
                )


def _storage(dtype: str) -> str:
    """How a base tensor was stored, in words: "an int8", "a 4-bit (nf4)" or "a float" base."""
    if dtype == "int8":
        return "an int8"
    return f"a 4-bit ({dtype})" if dtype in ("nf4", "fp4") else "a float"


def _dense_tensors(paths: list, inputs: list, weights: list[float], heads: str | int) -> dict[str, torch.Tensor]:
    if heads != "average":
        if isinstance(heads, bool) or not isinstance(heads, int) or not 0 <= heads < len(inputs):
            raise UsageError(f"heads must be 'average' or an input's index in [0, {len(inputs)}), got {heads!r}")
        meta, tensors = inputs[heads]
        return {n: tensors[n] for n in meta["saved_tensors"]}
    names = [meta["saved_tensors"] for meta, _ in inputs]
    if not any(names):
        return {}
    for path, own, (_, tensors) in zip(paths, names, inputs, strict=True):
        for name in set(names[0]) ^ set(own):
            raise UsageError(
                f"the inputs' densely saved tensors differ ({name} is not in all of them, e.g. {path}); "
                "pick one input's with heads=i"
            )
        for name in own:
            if tensors[name].shape != inputs[0][1][name].shape:
                raise UsageError(
                    f"densely saved {name} is {tuple(inputs[0][1][name].shape)} in {paths[0]} but "
                    f"{tuple(tensors[name].shape)} in {path} (different label sets?); pick one input's with heads=i"
                )
    if any(w <= 0 for w in weights):
        raise UsageError(
            f"densely saved tensors {names[0][:3]} are averaged with the weights, which must be positive ({weights}); "
            "pick one input's with heads=i"
        )
    total = sum(weights)
    return {
        name: sum(w * t[name].double() for w, (_, t) in zip(weights, inputs, strict=True))
        .div(total)
        .to(inputs[0][1][name].dtype)
        for name in names[0]
    }


@contextlib.contextmanager
def _attached(model: nn.Module, config: ComposedConfig, result: Delta, dense: dict[str, torch.Tensor]):
    """Attach `result` to the model as a temporary adapter; restore the model exactly afterwards."""
    state = getattr(model, "_sparsedelta", None)
    previous = state.active if state is not None else None
    name = "composed"
    while state is not None and name in state.adapters:
        name += "_"
    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        positions = {n: e.positions for n, e in result.items()}
        add_delta(model, config, positions, name, values={n: e.values for n, e in result.items()}, trainable=False)
        adapter = state_of(model).adapters[name]
        if set(adapter.saved) != set(dense):
            raise DeltaFileError(
                f"the base model's modules to save hold {sorted(adapter.saved)}, the inputs {sorted(dense)}; "
                "build the base model as for training"
            )
        with torch.no_grad():
            for path, param in adapter.saved.items():
                param.copy_(dense[path])
        yield name
    finally:
        if state is None:
            if getattr(model, "_sparsedelta", None) is not None:
                unload(model)
        else:
            if name in state.adapters:
                delete_adapter(model, name)
            set_adapter(model, previous)
        for p, flag in flags:
            p.requires_grad_(flag)
