"""Export a sparse delta as a PEFT SHiRA adapter, loadable with `PeftModel.from_pretrained(base, dir)`
where sparsedelta is not installed, with the same outputs as `sparsedelta.load(base, delta)`.

What SHiRA (PEFT 0.21) stores and checks: per adapted `nn.Linear`, `shira_weight` (k values) and
`shira_indices` (2 × k int32: row, column) with k = r·(m + n) for one `r` shared by every layer
(there is no per-layer rank pattern); `from_pretrained` builds each layer with exactly that many
values, so the count is enforced at load, not only by the mask function at creation. A delta
has its own count per layer, so the export takes the smallest r that holds the largest layer
and pads every layer with zero-valued entries at the lowest positions the delta does not use,
after its real entries; the safetensors metadata records the real counts, so `import_peft` drops
the padding again (bit-identical round trip). Padding changes nothing: θ + 0 = θ.

Per kind of tensor in the delta:

| tensor | exported as | why |
|---|---|---|
| `nn.Linear` weight | SHiRA entries, exact | SHiRA's own form |
| densely trained module (`modules_to_save`, e.g. a new head) | PEFT `modules_to_save`, exact | PEFT's own form |
| norm weight / bias (LayerNorm, RMSNorm, ...) | `modules_to_save`: the norm, merged (θ + δ), dense | PEFT has no sparse form for them; a norm is a few entries |
| embedding table | `modules_to_save`: the embedding, merged, dense (vocab × dim) | SHiRA adapts `nn.Linear` only; `trainable_token_indices` is LoRA's alone |
| bias of a Linear / Conv1D / conv | refused, named | SHiRA has no bias term; a dense copy of the layer would defeat the sparse file |
| transformers `Conv1D`, conv kernels, other weights | refused, named | SHiRA adapts `nn.Linear` only |
| a tied tensor (embedding = LM head) | refused, named | a PEFT adapter changes one module; the delta changes both |

The mask type written is "sparsedelta": PEFT then builds no random mask at load (a permutation of
m·n per layer) and takes the stored positions as they are.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..core.card import peft_task_type
from ..core.io import DELTA_FILE, load, read
from ..core.remote import locate
from ..core.targeting import CONTAINER, parameter_kind
from ..errors import UsageError
from .attach import temporarily
from .peft_files import PREFIX, write_adapter

MASK_TYPE = "sparsedelta"


@dataclass
class ShiraExport:
    """What `export_shira` wrote."""

    path: Path  # the adapter folder
    r: int  # SHiRA's r: every adapted layer holds r·(m + n) entries
    entries: dict[str, int] = field(default_factory=dict)  # by module: the delta's own entries
    padding: dict[str, int] = field(default_factory=dict)  # by module: zero-valued entries added
    dense: dict[str, int] = field(default_factory=dict)  # modules_to_save and the entries stored for each

    def __str__(self) -> str:
        real, pad, dense = sum(self.entries.values()), sum(self.padding.values()), sum(self.dense.values())
        return (
            f"PEFT SHiRA adapter in {self.path}: r={self.r}, {len(self.entries)} layers with {real:,} delta entries "
            f"+ {pad:,} zero-valued padding entries; {len(self.dense)} modules_to_save ({dense:,} dense entries)"
        )


def export_shira(
    delta: str | os.PathLike,
    base_model: nn.Module,
    output_dir: str | os.PathLike,
    base_model_name_or_path: str | None = None,
) -> ShiraExport:
    """Write the delta at `delta` as a PEFT SHiRA adapter folder in `output_dir`.

    Args:
        delta: a delta folder or file written by `sparsedelta.save`, or its hub id.
        base_model: the model the delta was trained on (its fingerprint is checked); it tells each
            tensor's layer type and gives the merged values of norms and embeddings. It is left as it came.
        output_dir: the adapter folder to write (adapter_config.json, adapter_model.safetensors).
        base_model_name_or_path: recorded in adapter_config.json; default: the model's `name_or_path`.

    Returns:
        A `ShiraExport` (r, entries and padding per layer, dense modules).

    Raises:
        UsageError: the delta holds tensors SHiRA cannot carry (named), or layers too small for the
            shared r, or a module name PEFT would match more than once.

    Example:
        >>> export_shira("runs/sst2", AutoModelForSequenceClassification.from_pretrained(base), "shira/")
        >>> model = PeftModel.from_pretrained(AutoModelForSequenceClassification.from_pretrained(base), "shira/")
    """
    located = locate(delta, DELTA_FILE)
    file_meta, _ = read(located)  # how the file stores values and positions, kept for the way back
    with temporarily(base_model, lambda name: load(base_model, located, adapter_name=name)) as (state, adapter, _):
        shira, dense_modules = _plan(base_model, state, adapter)
        r = max(math.ceil(d.num_entries / (m.in_features + m.out_features)) for m, d in shira.values())
        tensors, report = {}, ShiraExport(Path(output_dir), r)
        for name, (module, d) in sorted(shira.items()):
            tensors.update(_shira_tensors(name, module, d, r, report))
        for name in sorted(dense_modules):
            stored = {  # merged values (θ + δ) or the trained head, without the delta's own buffers
                k: v for k, v in base_model.get_submodule(name).state_dict().items() if CONTAINER not in k.split(".")
            }
            tensors.update({f"{name}.{k}": v.clone() for k, v in stored.items()})
            report.dense[name] = sum(v.numel() for v in stored.values())
        config = {
            "peft_type": "SHIRA",
            "task_type": peft_task_type(base_model),
            "base_model_name_or_path": base_model_name_or_path or getattr(base_model, "name_or_path", None) or None,
            "revision": None,
            "inference_mode": True,
            "r": r,
            "mask_type": MASK_TYPE,
            "random_seed": None,
            "target_modules": sorted(shira),
            "fan_in_fan_out": False,
            "init_weights": True,
            "modules_to_save": sorted(dense_modules) or None,
        }
        ours = {
            "version": 1,
            "entries": report.entries,
            "config": adapter.config.to_dict(),
            "values_dtype": file_meta.get("values_dtype", "float32"),
            "index_encoding": file_meta.get("index_encoding", "int32"),
        }
    write_adapter(output_dir, config, tensors, ours)
    return report


def _plan(model: nn.Module, state, adapter) -> tuple[dict[str, tuple[nn.Linear, object]], set[str]]:
    """(SHiRA layers by module name: (module, delta), module names for modules_to_save); refuses the rest."""
    module_names = {id(m): n for n, m in model.named_modules() if CONTAINER not in n.split(".")}
    if any(d.quantized for d in adapter.deltas.values()):
        raise UsageError(
            "this delta was trained over a quantized base (bitsandbytes int8/4-bit layers), which PEFT's SHiRA "
            "does not adapt, and over the float base it would be another model (it was trained against the "
            "dequantized θ): share it as a sparsedelta file for the same quantized base (sparsedelta.load), or "
            "as the merged float model of dequantized θ + Δ (sparsedelta merge, merge_and_unload(dequantize=True))"
        )
    shira, dense_modules, refused = {}, set(), []
    for path, d in adapter.deltas.items():
        owners = state.owners[path]
        module, pname = owners[0]
        route = _route(module, pname, [module_names.get(id(m), "?") for m, _ in owners])
        if route == "shira":
            shira[module_names[id(module)]] = (module, d)
        elif route == "dense":
            dense_modules.add(module_names[id(module)])
        else:
            refused.append(f"{path} ({route})")
    if refused:
        raise UsageError(
            "SHiRA cannot carry these tensors of the delta: " + "; ".join(refused) + ". Train without them "
            "(e.g. parameter_kinds=('weight',), target nn.Linear layers), or merge the delta into a plain model "
            "(sparsedelta.merge_and_unload) to share it without PEFT"
        )
    if not shira:
        raise UsageError("the delta has no nn.Linear weight entries, so there is nothing for SHiRA to hold")
    dense_modules |= {p.rpartition(".")[0] for p in adapter.saved}
    _check_unique_suffixes(sorted(dense_modules), list(module_names.values()))
    return shira, dense_modules


def _route(module: nn.Module, pname: str, owner_names: list[str]) -> str:
    """"shira", "dense", or why the tensor is refused."""
    if len(owner_names) > 1:
        return f"tied across {', '.join(owner_names)}: a PEFT adapter changes one module"
    if type(module) is nn.Linear and pname == "weight":  # a subclass may not run through its forward
        return "shira"
    kind = parameter_kind(module, pname)
    if kind in ("norm", "embedding"):
        return "dense"
    if kind == "bias":
        return f"the bias of a {type(module).__name__}: SHiRA has no bias term"
    return f"a {type(module).__name__} {pname}: SHiRA adapts nn.Linear weights only"


def _shira_tensors(name: str, module: nn.Linear, delta, r: int, report: ShiraExport) -> dict[str, torch.Tensor]:
    rows, cols = module.out_features, module.in_features
    budget = r * (rows + cols)
    if budget > rows * cols:
        raise UsageError(
            f"SHiRA gives every layer r·(m+n) entries with one r; this delta needs r={r} for its fullest layer, but "
            f"{name} ({rows}×{cols}) has only {rows * cols} entries (< {budget}), which PEFT refuses. Exclude that "
            "layer from the delta's targets, or export a delta with fewer entries per layer"
        )
    positions, _, values = delta.all_entries()
    pad = budget - len(positions)
    candidates = torch.arange(len(positions) + pad, device=positions.device)  # holds ≥ pad unused positions
    free = candidates[~torch.isin(candidates, positions)][:pad]
    flat = torch.cat([positions, free]).cpu()
    report.entries[name], report.padding[name] = len(positions), pad
    return {
        f"{name}.shira_indices": torch.stack([flat // cols, flat % cols]).to(torch.int32),
        f"{name}.shira_weight": torch.cat([values.detach().cpu(), values.new_zeros(pad).cpu()]),
    }


def _check_unique_suffixes(saved: list[str], all_modules: list[str]) -> None:
    """PEFT picks modules_to_save by `name.endswith(entry)` over "base_model.model.<module>" names, so
    "head" would also pick "lm_head"; such an export would not load as intended."""
    for entry in saved:
        others = [m for m in all_modules if m != entry and (PREFIX + m).endswith(entry)]
        if others:
            raise UsageError(
                f"module {entry!r} goes to PEFT's modules_to_save, which matches names by suffix and would also take "
                f"{others[:3]}; rename the module or exclude it from the delta before exporting"
            )

