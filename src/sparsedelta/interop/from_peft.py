"""Import a PEFT adapter as a sparse delta, saved with `sparsedelta.save` (so it carries a normal
base fingerprint and loads, switches and merges like any delta).

- **SHiRA**: the stored positions (2 × k row, column) and values, read from the file. Zero-valued
  padding that `export_shira` added is dropped again (its metadata holds the real counts), so
  export then import gives back the same positions and values, bit for bit.
- **Super-Tuning** (PEFT ≥ 0.21, `SupertuningConfig`, sparse mode `r=None`): the stored flat
  positions and values; with `save_precomputed_indices=False` the positions are recomputed from
  the base exactly as PEFT does at load, `torch.topk(|W|.flatten(), int(n·(1 − sparsity)),
  largest=select_top)`. Ties at the selection boundary are left to that same call, so the result
  is PEFT's own choice on this machine; the report counts the tied entries left out, because a
  base read on another device or torch version may break those ties otherwise (and the values
  would then sit at other positions than the ones they were trained at).
- **Any other adapter** (LoRA, Super-Tuning's LoRA hybrid, ...): PEFT merges each adapted layer
  into a copy of its weights and the difference ΔW to the base is read. If it is a sparse
  difference (at most half of a tensor's entries change) every changed entry is kept; a dense one
  (LoRA's B·A) is refused unless `sparsify=D` keeps the ⌈D·n⌉ largest |ΔW| per tensor, and the
  report gives the relative Frobenius error ‖ΔW − kept‖/‖ΔW‖ per tensor and over all of them.
  `sparsify` may be given for SHiRA and Super-Tuning too, which then go this way.

Densely stored modules (PEFT's `modules_to_save`) become the delta's densely trained tensors.
"""

from __future__ import annotations

import contextlib
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..core.adapters import add_delta
from ..core.config import DeltaConfig
from ..core.io import save
from ..core.selection import budget, check_density, smallest_k
from ..core.targeting import find_targets, parameter_kind
from ..errors import UsageError
from .attach import temporarily
from .peft_files import PREFIX, read_adapter

MAX_SPARSE_DENSITY = 0.5  # a tensor with more changed entries than this is a dense update, not a sparse difference


@dataclass
class PeftImport:
    """What `import_peft` read and wrote."""

    path: Path  # the delta file written
    peft_type: str
    entries: dict[str, int] = field(default_factory=dict)  # by parameter path
    dense: list[str] = field(default_factory=list)  # densely stored tensors (PEFT's modules_to_save)
    relative_error: dict[str, float] = field(default_factory=dict)  # ‖ΔW − kept‖_F / ‖ΔW‖_F per tensor
    overall_error: float = 0.0  # the same over all tensors together
    ties: dict[str, int] = field(default_factory=dict)  # recomputed Super-Tuning positions: tied entries left out
    notes: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        lines = [
            f"imported a PEFT {self.peft_type} adapter into {self.path}: {sum(self.entries.values()):,} delta entries "
            f"in {len(self.entries)} tensors, {len(self.dense)} dense tensors",
            f"relative Frobenius error of ΔW: {self.overall_error:.3e} overall",
        ]
        lines += [f"  {name}: {err:.3e}" for name, err in self.relative_error.items() if err > 0]
        return "\n".join(lines + self.notes)


def import_peft(
    adapter_dir: str | os.PathLike,
    base_model: nn.Module,
    output_dir: str | os.PathLike,
    sparsify: float | None = None,
) -> PeftImport:
    """Turn the PEFT adapter in `adapter_dir` into a sparse delta over `base_model`, saved in `output_dir`.

    Args:
        adapter_dir: a PEFT adapter folder (adapter_config.json + adapter_model.safetensors).
        base_model: the base model the adapter was trained on, without sparsedelta adapters. It is
            left as it came (PEFT is attached and removed again when ΔW must be computed by PEFT).
        output_dir: where `sparsedelta.save` writes the delta (with its base fingerprint and card).
        sparsify: keep only the ⌈sparsify·n⌉ largest |ΔW| entries of each tensor; required for
            adapters whose ΔW is dense (LoRA).

    Returns:
        A `PeftImport` (entries per tensor, relative errors of ΔW, Super-Tuning ties, notes).

    Example:
        >>> report = import_peft("lora_adapter/", base, "delta/", sparsify=0.01)
        >>> print(report.overall_error); sparsedelta.load(fresh_base, "delta/")
    """
    if getattr(base_model, "_sparsedelta", None) is not None:
        raise UsageError("import onto the bare base model: this one has sparsedelta adapters (sparsedelta.unload)")
    if sparsify is not None:
        check_density(sparsify)
    config, tensors, ours = read_adapter(adapter_dir)
    peft_type = str(config.get("peft_type"))
    params = dict(base_model.named_parameters())
    dense = {k: v for k, v in tensors.items() if k in params}
    rest = {k: v for k, v in tensors.items() if k not in params}
    report = PeftImport(Path(output_dir), peft_type, dense=sorted(dense))
    if sparsify is None and peft_type == "SHIRA":
        positions, values = _from_shira(rest, params, ours, report)
    elif sparsify is None and peft_type == "SUPERTUNING" and config.get("r") is None:
        positions, values = _from_supertuning(rest, params, config, report)
    else:
        positions, values = _from_merged(adapter_dir, base_model, sparsify, report, set(tensors))
    if not positions:
        raise UsageError(f"the {peft_type} adapter in {adapter_dir} changes no entry of the base model")
    nonfinite = sorted(n for n, v in {**(values or {}), **dense}.items() if not torch.isfinite(v).all())
    if nonfinite:  # checked before anything is written: `load` would refuse the delta later
        raise UsageError(
            f"the {peft_type} adapter in {adapter_dir} holds NaN or infinite values in {', '.join(nonfinite[:3])}"
            f"{' ...' if len(nonfinite) > 3 else ''}; it diverged in training: export it from an earlier checkpoint"
        )

    delta_config = _config(base_model, positions, dense, ours.get("config"))
    card = {"base_model": config.get("base_model_name_or_path"), "Imported from PEFT": _provenance(report, sparsify)}

    def attach(name: str):
        add_delta(base_model, delta_config, positions, name, values=values, trainable=False)

    with temporarily(base_model, attach) as (_, adapter, name):
        with torch.no_grad():
            for path, param in adapter.saved.items():
                if path in dense:
                    param.copy_(dense[path])
        dtype, encoding = ours.get("values_dtype", "float32"), ours.get("index_encoding", "int32")  # as before export
        report.path = save(base_model, output_dir, adapter_name=name, dtype=dtype, index_encoding=encoding, card=card)
    report.entries = {name: len(idx) for name, idx in positions.items()}
    return report


# -- SHiRA and Super-Tuning: read from the file ------------------------------------------------------
def _from_shira(rest, params, ours, report):
    _only(rest, (".shira_indices", ".shira_weight"), "SHIRA")
    positions, values = {}, {}
    for module in sorted({k.rpartition(".")[0] for k in rest}):
        weight = _weight_of(module, params)
        index, value = _tensor(rest, f"{module}.shira_indices", 2).long(), _tensor(rest, f"{module}.shira_weight")
        if index.shape != (2, len(value)):
            raise UsageError(f"{module}: shira_indices of shape {tuple(index.shape)} for {len(value)} values")
        flat = index[0] * weight.shape[1] + index[1]
        real = ours.get("entries", {}).get(module)
        if real is not None and not value[real:].any():
            flat, value = flat[:real], value[:real]  # export_shira's padding
        elif real is not None:
            report.notes.append(f"{module}: the zero padding of the export was trained further; kept as entries")
        positions[f"{module}.weight"], values[f"{module}.weight"] = _sorted(flat, value, weight, module)
    return positions, values


def _from_supertuning(rest, params, config, report):
    _only(rest, (".supertuning_indices", ".supertuning_values"), "SUPERTUNING")
    positions, values = {}, {}
    for module in sorted({k.rpartition(".")[0] for k in rest}):
        weight = _weight_of(module, params)
        value = _tensor(rest, f"{module}.supertuning_values")
        flat = _tensor(rest, f"{module}.supertuning_indices") if f"{module}.supertuning_indices" in rest else None
        if flat is None:  # save_precomputed_indices=False
            flat, report.ties[module] = _topk_like_peft(weight, config)
            if report.ties[module]:
                report.notes.append(
                    f"{module}: {report.ties[module]} entries tie with the last selected |θ| and were left out by "
                    "torch.topk (as by PEFT's load here); another device or torch version may choose otherwise"
                )
        if len(flat) != len(value):
            raise UsageError(
                f"{module}: {len(value)} values for {len(flat)} positions; the base or the sparsity differs from training"
            )
        positions[f"{module}.weight"], values[f"{module}.weight"] = _sorted(flat.long(), value, weight, module)
    return positions, values


def _topk_like_peft(weight: torch.Tensor, config: dict) -> tuple[torch.Tensor, int]:
    """PEFT's Super-Tuning selection, the same call on the same tensor; and how many entries tie
    with the boundary value but were not selected."""
    sparsity, top = config.get("sparsity", 0.99), config.get("select_top", True)
    if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)) or not 0 <= sparsity < 1 or not isinstance(top, bool):
        raise UsageError(f"the Super-Tuning adapter_config.json has sparsity={sparsity!r}, select_top={top!r}; the adapter is damaged")
    scores = weight.detach().abs().flatten()
    k = int(scores.numel() * (1 - sparsity))
    index = torch.topk(scores, k=k, largest=top).indices
    boundary = scores[index].min() if top else scores[index].max()
    return index, int((scores == boundary).sum() - (scores[index] == boundary).sum())


def _sorted(flat, value, weight, module):
    """Positions sorted, values along; a repeated position (never from PEFT's own masks) is summed,
    as PEFT's sparse forward does."""
    if len(flat) and (flat.min() < 0 or flat.max() >= weight.numel()):
        raise UsageError(f"{module}: positions fall outside its {tuple(weight.shape)} weight; the adapter is damaged")
    unique, inverse = torch.unique(flat, return_inverse=True)
    if len(unique) == len(flat):
        return unique, value[torch.argsort(flat)]
    return unique, torch.zeros(len(unique), dtype=value.dtype).index_add_(0, inverse, value)


# -- any adapter: ΔW from PEFT's own merge -------------------------------------------------------------
def _from_merged(adapter_dir, base_model, sparsify, report, stored: set[str]):
    differences = _merged_differences(adapter_dir, base_model, stored)
    positions, values, dropped, total = {}, {}, 0.0, 0.0
    for path, diff in differences.items():
        flat = diff.reshape(-1)
        changed = int(torch.count_nonzero(flat))
        if changed == 0:
            continue
        if sparsify is None and changed > MAX_SPARSE_DENSITY * flat.numel():
            raise UsageError(
                f"this {report.peft_type} adapter is not a sparse difference: it changes {changed / flat.numel():.0%} "
                f"of {path}; pass --sparsify D (in Python sparsify=D) to keep the D·n largest |ΔW| entries of each tensor (e.g. 0.01)"
            )
        k = changed if sparsify is None else min(changed, budget(flat.numel(), sparsify))
        keep = smallest_k({path: -flat.abs()}, k)[path]
        norm2 = float(flat.double().pow(2).sum())
        lost2 = norm2 - float(flat[keep].double().pow(2).sum())
        report.relative_error[path] = math.sqrt(max(lost2, 0.0) / norm2) if norm2 > 0 else 0.0
        dropped, total = dropped + max(lost2, 0.0), total + norm2
        positions[path], values[path] = keep, flat[keep].float()
    report.overall_error = math.sqrt(dropped / total) if total > 0 else 0.0
    return positions, values


def _merged_differences(adapter_dir, base_model, stored: set[str]) -> dict[str, torch.Tensor]:
    """θ_merged − θ per parameter of every adapted layer, from PEFT's own merge; the model is restored.
    `stored`: the tensors in the adapter's file (PEFT only warns when some it needs are missing)."""
    try:
        from peft import PeftModel, get_peft_model_state_dict
        from peft.tuners.tuners_utils import BaseTunerLayer
    except ImportError as e:
        raise UsageError("importing this adapter needs PEFT to compute its ΔW: pip install peft") from e
    names = {id(p): n for n, p in base_model.named_parameters()}
    flags = {n: p.requires_grad for n, p in base_model.named_parameters()}
    was_training = base_model.training
    with _peft_errors(adapter_dir):
        peft_model = PeftModel.from_pretrained(base_model, str(adapter_dir))
    differences = {}
    try:
        missing = sorted(k.removeprefix(PREFIX) for k in get_peft_model_state_dict(peft_model))
        missing = [k for k in missing if k not in stored]
        if missing:
            raise UsageError(
                f"the adapter in {adapter_dir} lacks tensors its config asks for ({', '.join(missing[:3])}"
                f"{' ...' if len(missing) > 3 else ''}); the adapter file is incomplete"
            )
        with torch.no_grad(), _peft_errors(adapter_dir):
            for layer in peft_model.modules():
                if not isinstance(layer, BaseTunerLayer) or not hasattr(layer, "merge"):
                    continue
                base = layer.get_base_layer()
                original = {n: p.detach().clone() for n, p in base.named_parameters(recurse=False) if id(p) in names}
                layer.merge()
                for pname, before in original.items():
                    param = getattr(base, pname)
                    diff = param.detach() - before
                    if diff.any():
                        differences[names[id(param)]] = diff
                    param.copy_(before)  # bit-exact, where unmerging would round
                layer.merged_adapters.clear()
    finally:
        peft_model.unload()
        with contextlib.suppress(AttributeError):
            del base_model.peft_config
        for n, p in base_model.named_parameters():
            p.requires_grad_(flags[n])
        base_model.train(was_training)
    return differences


@contextlib.contextmanager
def _peft_errors(adapter_dir):
    """PEFT's own failures on a config or tensor that does not fit the base (many lines deep) as one line."""
    try:
        yield
    except Exception as e:
        first = next((line for line in str(e).splitlines() if line.strip()), type(e).__name__)
        raise UsageError(
            f"PEFT cannot apply the adapter in {adapter_dir} to this base model ({type(e).__name__}: {first[:300]}); "
            "is --model the base it was trained on, and are its adapter_config.json and tensors intact?"
        ) from e


# -- shared ------------------------------------------------------------------------------------------
def _tensor(rest: dict, key: str, dims: int = 1) -> torch.Tensor:
    tensor = rest.get(key)
    if tensor is None or tensor.dim() != dims:
        found = "missing" if tensor is None else f"of shape {tuple(tensor.shape)}"
        raise UsageError(f"the adapter's {key} is {found}, not a {dims}-D tensor; the adapter is damaged")
    return tensor


def _only(rest: dict, suffixes: tuple[str, ...], peft_type: str) -> None:
    unknown = [k for k in rest if not k.endswith(suffixes)]
    if unknown:
        raise UsageError(
            f"the {peft_type} adapter holds tensors that are neither its own nor the base model's: {unknown[:5]}; "
            "is this the base model it was trained on?"
        )


def _weight_of(module: str, params: dict) -> torch.Tensor:
    weight = params.get(f"{module}.weight")
    if weight is None or weight.dim() != 2:
        raise UsageError(f"the adapter adapts {module!r}, which this base model has no 2-D weight for")
    return weight


def _config(model: nn.Module, positions: dict, dense: dict, original: dict | None) -> DeltaConfig:
    """The delta's own config back when the adapter was exported from one and still describes it;
    else a plain config naming exactly the imported tensors."""
    saved_modules = sorted({p.rpartition(".")[0] for p in dense})
    if original is not None:
        with contextlib.suppress(ValueError, KeyError):
            config = DeltaConfig.from_dict(original)
            targets, saved = find_targets(model, config)
            if set(positions) <= set(targets) and sorted(saved) == saved_modules:
                return config
    modules = dict(model.named_modules())
    owners = {path: path.rpartition(".") for path in positions}
    kinds = sorted({parameter_kind(modules[m], p) for m, _, p in owners.values()})
    return DeltaConfig(
        target_modules=sorted({m for m, _, _ in owners.values()}),
        parameter_kinds=tuple(kinds),
        modules_to_save=saved_modules or None,
    )


def _provenance(report: PeftImport, sparsify: float | None) -> dict:
    info = {"adapter type": report.peft_type, "dense tensors (modules_to_save)": len(report.dense)}
    if sparsify is not None:
        info["sparsify (largest |ΔW| kept per tensor)"] = sparsify
        info["relative Frobenius error of ΔW, overall"] = report.overall_error
    return info
