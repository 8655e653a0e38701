"""SoRA (Ding et al., EMNLP 2023, arXiv 2311.11696): a LoRA whose rank sparsifies itself through a gate.

Not SaRA (`methods/sara.py`, Hu et al., arXiv 2409.06633): SoRA adds a low-rank branch per linear
layer; it is not a sparse delta and does not use the core's delta machinery, only its targeting
rules and atomic writes.

Every formula, in one place each:
- the layer (`SoRALinear.forward`): Δy = ((dropout(x) Aᵀ) ⊙ g) Bᵀ · α/r with A [r, in]
  kaiming-uniform(a=√5), B [out, r] = 0 (the model is unchanged at start) and the gate g [r]
  drawn N(0, 1) as the official code does (`gate_init="normal"`) or set to 1 (`"ones"`);
- the soft threshold (`soft_threshold`): T_t(g) = sign(g)·max(|g| − t, 0);
- the proximal step (`proximal_step`, run after every optimizer step by `proximal_hook`):
  g ← T_t(g) with t = η_t·ξ, η_t the gate group's current learning rate (`threshold="proximal"`,
  the paper), or t = ξ whatever the learning rate (`threshold="official"`, the official code);
- the L1 term in the loss (`l1_penalty`): l1_in_loss · Σ|g| / (number of gate entries), the official
  code's second mechanism; 0 by default in "proximal" mode, where the proximal step is the L1 term;
- rank pruning (`pruned_factors`): keep = (g ≠ 0), A′ = A[keep], B′ = B[:, keep]·g[keep], scaling α/r
  unchanged; the result is an ordinary LoRA of rank nnz(g);
- the ξ grids of the sparsifying scheduler (`xi_schedule`) and its stages (`sparsify`).

Why a layer of our own rather than PEFT's LoRA layer with a gate: PEFT is an optional dependency of
sparsedelta, and its `lora.Linear.forward` carries DoRA, mixed-batch and multi-adapter paths that a
gate would have to be threaded through. The wrapper below is a few lines (base layer frozen, forward =
base(x) + the gated term, the same operation order as PEFT's forward); what users need from PEFT is
its file format, which `export_peft` writes directly, and which PEFT alone loads (tested).

Where we differ from the official code (TsinghuaC3I/SoRA) and why:
- The threshold. The official `SparseAdamW` applies three in-place masks one after the other
  (g > ξ → g − ξ; g < −ξ → g + ξ; |g| < ξ → 0), so a gate in (ξ, 2ξ) is first shrunk and then
  zeroed: its operator is not T_ξ. We apply T exactly, in both modes.
- Stages. The official scheduler reuses one optimizer and its linear schedule across stages; the
  schedule is exhausted after the first stage, so later stages train at lr 0 and only the threshold
  acts. `sparsify` asks the caller for a new optimizer and schedule every stage and refuses the old one.
- The gate's optimizer. Officially it is a second optimizer that never steps under DeepSpeed; here the
  gates are one parameter group of the single optimizer (`param_groups`: own lr, no weight decay), and
  `proximal_step` refuses gates the optimizer does not hold.
- fp16. The official code steps the gate optimizer after `scaler.update()`; here the threshold is a
  step post-hook of the one optimizer, so it runs exactly when `GradScaler.step` really stepped (not on
  a skipped, overflowing step) and before `update()`.
- Rank pruning and export are not in the official code (it only counts zero gates, assuming square
  layers). A layer whose gates all died keeps a rank-0 branch (adds exactly 0); `export_peft` leaves it
  out of the adapter and `merge` leaves its weight untouched.
- The official configuration also unfreezes every LayerNorm; here only `modules_to_save` are trained
  densely (name them, e.g. modules_to_save=["LayerNorm", "classifier"]).
- Adapter weights of a float16/bfloat16 base are kept in float32 (as PEFT does); inputs are cast.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from ..core.io import atomic_write
from ..core.targeting import _check_patterns_match, matches

GATE_GROUP = "sora_gates"  # name of the optimizer group that holds the gates
STATE_FILE = "sora_state.safetensors"
CONFIG_FILE = "sora_config.json"
FORMAT = "sparsedelta-sora"
FORMAT_VERSION = 1
PEFT_CONFIG_FILE = "adapter_config.json"
PEFT_WEIGHTS_FILE = "adapter_model.safetensors"
THRESHOLD_MODES = ("proximal", "official")
GATE_INITS = ("normal", "ones")
GRIDS = ("linear", "log_linear", "exp_linear")
# Defaults per threshold mode, from the official DeBERTaV3-base scripts (lr 8e-4, sparse_lambda_2 3e-4,
# sparse_lambda 10); in "proximal" mode ξ is the threshold relative to the lr: 3e-4 / 8e-4 = 0.375.
DEFAULT_XI = {"proximal": 0.375, "official": 3e-4}
DEFAULT_L1_IN_LOSS = {"proximal": 0.0, "official": 10.0}


def _help(text: str, default=None, **kwargs):
    return field(default=default, metadata={"help": text}, **kwargs)


@dataclass
class SoRAConfig:
    """A SoRA adapter: which layers get a gated low-rank branch, and how the gates are sparsified."""

    r: int = _help("r_max, the rank of every branch before sparsification (official: 8 or 16)", 8)
    lora_alpha: float = _help("α: the branch is scaled by α / r (kept after pruning)", 16.0)
    lora_dropout: float = _help("dropout on the branch's input", 0.0)
    target_modules: list[str] | str | None = _help(
        "layers to adapt: a list matches a module name exactly or as its last part(s), a string is a regex "
        "that must match the whole name; None = every nn.Linear (and transformers Conv1D)"
    )
    exclude_modules: list[str] | str | None = _help("layers never adapted, same matching as target_modules")
    modules_to_save: list[str] | None = _help("modules trained densely and saved in full (e.g. a new head)")
    gate_init: str = _help("'normal': g ~ N(0, 1) as the official code; 'ones': g = 1", "normal")
    threshold: str = _help(
        "'proximal': after each step g ← T(g, lr·ξ), the paper; 'official': T(g, ξ) not scaled by the lr, "
        "plus l1_in_loss·mean|g| in the loss, as the official code",
        "proximal",
    )
    xi: float | None = _help(
        "ξ, the L1 strength (None: 0.375 in 'proximal' mode, 3e-4 in 'official' mode, both from the official "
        "DeBERTaV3 scripts at lr 8e-4)"
    )
    l1_in_loss: float | None = _help(
        "weight of mean|g| added to the loss (None: 10 in 'official' mode as the official scripts, 0 in 'proximal')"
    )
    gate_lr: float | None = _help("learning rate of the gates (None: the main learning rate)")
    schedule: list[float] | None = _help("ξ per sparsifying stage (strictly increasing); None: one stage at xi")
    seed: int | None = _help("seed of A's and g's initial values (None: torch's global generator)")

    def __post_init__(self):
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r < 1:
            raise ValueError(f"r must be an integer >= 1, got {self.r!r}; the SoRA paper uses r = 8 or 16")
        if not (isinstance(self.lora_alpha, (int, float)) and math.isfinite(self.lora_alpha) and self.lora_alpha > 0):
            raise ValueError(f"lora_alpha must be a positive number, got {self.lora_alpha!r} (default 16)")
        if not 0 <= self.lora_dropout < 1:
            raise ValueError(f"lora_dropout must be in [0, 1), got {self.lora_dropout!r}")
        if self.gate_init not in GATE_INITS:
            raise ValueError(f"gate_init must be one of {list(GATE_INITS)}, got {self.gate_init!r}")
        if self.threshold not in THRESHOLD_MODES:
            raise ValueError(
                f"threshold must be 'proximal' (lr·ξ, the paper) or 'official' (fixed ξ, the official code), "
                f"got {self.threshold!r}"
            )
        if self.xi is None:
            self.xi = DEFAULT_XI[self.threshold]
        if self.l1_in_loss is None:
            self.l1_in_loss = DEFAULT_L1_IN_LOSS[self.threshold]
        _check_non_negative("xi", self.xi)
        _check_non_negative("l1_in_loss", self.l1_in_loss)
        if self.gate_lr is not None and not (
            isinstance(self.gate_lr, (int, float)) and math.isfinite(self.gate_lr) and self.gate_lr > 0
        ):
            raise ValueError(f"gate_lr must be > 0 or None (= the main learning rate), got {self.gate_lr!r}")
        if self.schedule is not None:
            self.schedule = check_schedule(self.schedule)
        for option in ("target_modules", "exclude_modules", "modules_to_save"):
            value = getattr(self, option)
            if isinstance(value, tuple):
                value = list(value)
                setattr(self, option, value)
            if value is not None and not isinstance(value, (str, list)):
                raise ValueError(f"{option} must be a list of names, a regex string or None, got {value!r}")
        if isinstance(self.modules_to_save, str):
            raise ValueError(f"modules_to_save must be a list of module names, got the string {self.modules_to_save!r}")

    def to_dict(self) -> dict:
        return {"method": "sora", **dataclasses.asdict(self)}

    @staticmethod
    def from_dict(data: dict) -> SoRAConfig:
        data = {k: v for k, v in data.items() if k != "method"}
        unknown = sorted(set(data) - {f.name for f in dataclasses.fields(SoRAConfig)})
        if unknown:
            raise ValueError(
                f"unknown SoRA settings {unknown}; known: {[f.name for f in dataclasses.fields(SoRAConfig)]}"
            )
        return SoRAConfig(**data)


def _check_non_negative(name: str, value) -> None:
    if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")


def check_schedule(schedule) -> list[float]:
    """Return the stages' ξ as floats; refuse an empty, negative or not strictly increasing list."""
    values = [float(x) for x in schedule]
    if not values:
        raise ValueError("the sparsifying schedule is empty; give at least one ξ (e.g. xi_schedule('linear', ...))")
    for x in values:
        _check_non_negative("every ξ of the schedule", x)
    falls = [(a, b) for a, b in zip(values, values[1:]) if not b > a]
    if falls:
        raise ValueError(
            f"the sparsifying schedule must be strictly increasing (each stage raises ξ), but {falls[0][1]:g} "
            f"follows {falls[0][0]:g} in {values}"
        )
    return values


# -- the layer -------------------------------------------------------------------------------------
def _conv1d_type(module: nn.Module) -> bool:  # transformers' Conv1D (GPT-2): y = x W + b, W of shape (in, out)
    kind = type(module)
    return kind.__name__ == "Conv1D" and kind.__module__.startswith("transformers")


# layer kind -> (in_features, out_features) of its weight; whether the weight is stored transposed (in, out)
_KINDS: dict[str, tuple[Callable[[nn.Module], tuple[int, int]], bool]] = {
    "linear": (lambda m: (m.in_features, m.out_features), False),
    "conv1d": (lambda m: (m.weight.shape[0], m.weight.shape[1]), True),
}


def _kind(module: nn.Module) -> str | None:
    # MultiheadAttention reads its out_proj's weight without calling it: a branch there would never act
    if isinstance(module, nn.Linear) and not isinstance(module, nn.modules.linear.NonDynamicallyQuantizableLinear):
        return "linear"
    return "conv1d" if _conv1d_type(module) else None


class SoRALinear(nn.Module):
    """A frozen linear layer plus the gated low-rank branch ((dropout(x) Aᵀ) ⊙ g) Bᵀ · scaling."""

    def __init__(self, base_layer: nn.Module, r: int, lora_alpha: float, lora_dropout: float = 0.0):
        super().__init__()
        self.base_layer = base_layer
        self.kind = _kind(base_layer)
        in_features, out_features = _KINDS[self.kind][0](base_layer)
        weight = base_layer.weight
        dtype = torch.float32 if weight.dtype in (torch.float16, torch.bfloat16) else weight.dtype
        factory = {"device": weight.device, "dtype": dtype}
        self.lora_A = nn.Parameter(torch.zeros(r, in_features, **factory))
        self.lora_B = nn.Parameter(torch.zeros(out_features, r, **factory))
        self.gate = nn.Parameter(torch.ones(r, **factory))
        self.scaling = lora_alpha / r  # fixed at r_max: pruning keeps it
        self.dropout = nn.Dropout(lora_dropout) if lora_dropout > 0 else nn.Identity()

    @property
    def weight(self) -> torch.Tensor:  # for code that reads layer.weight (e.g. weight tying)
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base_layer.bias

    @property
    def rank(self) -> int:
        return self.lora_A.shape[0]

    def reset(self, gate_init: str, generator: torch.Generator | None = None) -> None:
        """A kaiming-uniform(a=√5) as nn.Linear and PEFT, B = 0, g by `gate_init`; drawn on the CPU so a
        seed gives the same values on every device."""
        a = torch.empty(self.lora_A.shape, dtype=torch.float32)
        nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=generator)
        if gate_init == "normal":
            g = torch.randn(self.rank, generator=generator)
        else:
            g = torch.ones(self.rank)
        with torch.no_grad():
            self.lora_A.copy_(a)
            self.lora_B.zero_()
            self.gate.copy_(g)

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        h = F.linear(self.dropout(x).to(self.lora_A.dtype), self.lora_A) * self.gate
        return F.linear(h, self.lora_B) * self.scaling

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        out = self.base_layer(x, *args, **kwargs)
        if self.rank == 0:  # every gate died and the layer was pruned: the branch adds exactly 0
            return out
        return out + self.delta(x).to(out.dtype)

    def extra_repr(self) -> str:
        return f"rank={self.rank}, scaling={self.scaling:g}"


@dataclass
class _State:
    config: SoRAConfig
    saved: list[str]  # names of the modules trained densely


def _state(model: nn.Module) -> _State:
    state = getattr(model, "_sora", None)
    if state is None:
        raise ValueError(
            "this model has no SoRA layers; call sparsedelta.sora.attach(model, config) or sora.load first"
        )
    return state


def config_of(model: nn.Module) -> SoRAConfig:
    """The SoRA config attached to `model` (with its current ξ)."""
    return _state(model).config


def layers(model: nn.Module) -> dict[str, SoRALinear]:
    """The SoRA layers of `model`, by module name."""
    _state(model)
    return {n: m for n, m in model.named_modules() if isinstance(m, SoRALinear)}


def _saved_parameters(model: nn.Module, saved: list[str]) -> dict[str, nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if any(n.startswith(s + ".") for s in saved)}


def _find_layers(model: nn.Module, config: SoRAConfig) -> tuple[list[str], list[str]]:
    names = [n for n, _ in model.named_modules()]
    for option in ("target_modules", "exclude_modules", "modules_to_save"):
        _check_patterns_match(getattr(config, option), names, option)
    saved = [n for n in names if n and matches(n, config.modules_to_save)]
    inside_saved = lambda n: any(n == s or n.startswith(s + ".") for s in saved)  # noqa: E731
    found = [
        name
        for name, module in model.named_modules()
        if _kind(module) is not None
        and (config.target_modules is None or matches(name, config.target_modules))
        and not matches(name, config.exclude_modules)
        and not inside_saved(name)
    ]
    if not found:
        raise ValueError(
            f"no nn.Linear or Conv1D layer matched target_modules={config.target_modules!r} outside "
            f"modules_to_save={config.modules_to_save!r}; SoRA adapts linear layers only"
        )
    return found, saved


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def attach(model: nn.Module, config: SoRAConfig | None = None) -> nn.Module:
    """Give every targeted linear layer a gated low-rank branch; freeze everything else except
    `modules_to_save`, which are trained densely in place.

    Args:
        model: any torch model (its nn.Linear / transformers Conv1D layers are adapted).
        config: the SoRA settings (default SoRAConfig()).

    Returns:
        The same model, changed in place.

    Example:
        >>> model = sora.attach(model, SoRAConfig(r=8, modules_to_save=["classifier"]))
        >>> optimizer = torch.optim.AdamW(sora.param_groups(model, lr=8e-4, weight_decay=0.1))
        >>> sora.proximal_hook(model, optimizer)  # thresholds the gates after every step
    """
    config = config or SoRAConfig()
    if getattr(model, "_sora", None) is not None:
        raise ValueError("this model already has SoRA layers; attach to a fresh base model (or use sora.merge first)")
    targets, saved = _find_layers(model, config)
    generator = torch.Generator().manual_seed(config.seed) if config.seed is not None else None
    for p in model.parameters():
        p.requires_grad_(False)
    for name in targets:
        layer = SoRALinear(model.get_submodule(name), config.r, config.lora_alpha, config.lora_dropout)
        layer.reset(config.gate_init, generator)
        _replace(model, name, layer)
    for p in _saved_parameters(model, saved).values():
        p.requires_grad_(True)
    model._sora = _State(config, saved)
    return model


def set_xi(model: nn.Module, xi: float) -> None:
    """Change ξ of an attached model (the sparsifying scheduler raises it stage by stage)."""
    state = _state(model)
    state.config = dataclasses.replace(state.config, xi=float(xi))


# -- training: parameter groups, penalty, proximal step --------------------------------------------
def param_groups(model: nn.Module, lr: float, gate_lr: float | None = None, weight_decay: float = 0.0) -> list[dict]:
    """Optimizer groups: A, B and the ≥2-D densely trained tensors (with weight decay); the 1-D
    densely trained ones (biases, norms: none); the gates (group "sora_gates": own lr, no weight decay).

    Args:
        lr: the main learning rate.
        gate_lr: the gates' learning rate (default: the config's gate_lr, else lr).
        weight_decay: for A, B and the densely trained matrices.

    Returns:
        A list of parameter-group dicts for any torch optimizer (empty groups left out).
    """
    state = _state(model)
    gate_lr = gate_lr if gate_lr is not None else (state.config.gate_lr if state.config.gate_lr is not None else lr)
    low_rank = [p for m in layers(model).values() for p in (m.lora_A, m.lora_B)]
    dense = [p for p in _saved_parameters(model, state.saved).values() if p.requires_grad]
    groups = [
        {"params": low_rank + [p for p in dense if p.dim() >= 2], "lr": lr, "weight_decay": weight_decay},
        {"params": [p for p in dense if p.dim() < 2], "lr": lr, "weight_decay": 0.0},
        {"params": [m.gate for m in layers(model).values()], "lr": gate_lr, "weight_decay": 0.0, "name": GATE_GROUP},
    ]
    return [g for g in groups if g["params"]]


def soft_threshold(g: torch.Tensor, t: float) -> torch.Tensor:
    """T_t(g) = sign(g)·max(|g| − t, 0): the proximal operator of t·‖g‖₁."""
    if not t >= 0:
        raise ValueError(f"the soft threshold must be >= 0, got {t!r}")
    return torch.sign(g) * torch.clamp(g.abs() - t, min=0)


def l1_penalty(model: nn.Module) -> torch.Tensor:
    """l1_in_loss · Σ|g| / (number of gate entries), the official code's loss term; add it to the loss
    before backward (exactly 0, with no graph, when l1_in_loss is 0: the default in "proximal" mode)."""
    state = _state(model)
    gates = [m.gate for m in layers(model).values()]
    weight = state.config.l1_in_loss
    count = sum(g.numel() for g in gates)
    if weight == 0 or count == 0:
        return torch.zeros((), device=gates[0].device if gates else None)
    return weight * sum(g.abs().sum() for g in gates) / count


def _gate_lrs(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, float]:
    lr_of = {id(p): group["lr"] for group in optimizer.param_groups for p in group["params"]}
    missing = [n for n, m in layers(model).items() if id(m.gate) not in lr_of]
    if missing:
        raise ValueError(
            f"the optimizer does not hold the gates of {missing[:3]}{' …' if len(missing) > 3 else ''}: they would "
            "never train; build the optimizer from sora.param_groups(model, lr)"
        )
    return {n: float(lr_of[id(m.gate)]) for n, m in layers(model).items()}


@torch.no_grad()
def proximal_step(model: nn.Module, lr: float | torch.optim.Optimizer) -> dict[str, float]:
    """Soft-threshold every gate; call right after optimizer.step() (or use `proximal_hook`).

    Args:
        lr: the optimizer (the gates' group lr is read at this moment, i.e. the lr of the step just
            taken, before the scheduler moves it), or that learning rate as a number.

    Returns:
        The threshold applied to each layer: lr·ξ in "proximal" mode, ξ in "official" mode.
    """
    config = config_of(model)
    found = layers(model)
    if isinstance(lr, torch.optim.Optimizer):
        lrs = _gate_lrs(model, lr)
    else:
        lrs = dict.fromkeys(found, float(lr))
    applied = {}
    for name, layer in found.items():
        t = lrs[name] * config.xi if config.threshold == "proximal" else config.xi
        layer.gate.copy_(soft_threshold(layer.gate, t))
        applied[name] = t
    return applied


def proximal_hook(model: nn.Module, optimizer: torch.optim.Optimizer):
    """Run `proximal_step(model, optimizer)` after every `optimizer.step()`; returns the hook's handle
    (`.remove()` it when the optimizer is retired). With a GradScaler the hook fires only on steps the
    scaler really takes. Pass the torch optimizer itself (e.g. not accelerate's wrapper)."""
    _gate_lrs(model, optimizer)  # refuse now an optimizer without the gates
    return optimizer.register_step_post_hook(lambda opt, args, kwargs: proximal_step(model, opt))


# -- reading the gates -----------------------------------------------------------------------------
def gate_counts(model: nn.Module) -> dict[str, int]:
    """Nonzero gates per layer: the rank each layer would keep if pruned now."""
    return {n: int(torch.count_nonzero(m.gate)) for n, m in layers(model).items()}


def ranks(model: nn.Module) -> dict[str, int]:
    """Current rank of each layer's branch: r before pruning, nnz(g) after."""
    return {n: m.rank for n, m in layers(model).items()}


# -- pruning, merging, exporting -------------------------------------------------------------------
@torch.no_grad()
def pruned_factors(layer: SoRALinear) -> tuple[torch.Tensor, torch.Tensor]:
    """(A′, B′) of the equivalent ordinary LoRA: keep = g ≠ 0, A′ = A[keep], B′ = B[:, keep]·g[keep]."""
    keep = layer.gate != 0
    return layer.lora_A[keep].clone(), layer.lora_B[:, keep] * layer.gate[keep]


@torch.no_grad()
def prune(model: nn.Module) -> dict[str, int]:
    """Drop the zero gates with their rows of A and columns of B and fold g into B (g becomes 1, so the
    branch is an ordinary LoRA of rank nnz(g) with the same scaling). In place; returns the new ranks.
    Build the optimizer again afterwards: the parameters are new tensors."""
    for layer in layers(model).values():
        a, b = pruned_factors(layer)
        layer.lora_A = nn.Parameter(a, requires_grad=layer.lora_A.requires_grad)
        layer.lora_B = nn.Parameter(b, requires_grad=layer.lora_B.requires_grad)
        layer.gate = nn.Parameter(torch.ones_like(layer.gate[: a.shape[0]]), requires_grad=layer.gate.requires_grad)
    return ranks(model)


@torch.no_grad()
def merge(model: nn.Module) -> nn.Module:
    """Fold each pruned branch into its base weight (W += scaling·B′A′) and put the plain layers back;
    the densely trained modules keep their trained values and every requires_grad flag stays as it is.
    Returns the plain model (same object)."""
    for name, layer in layers(model).items():
        a, b = pruned_factors(layer)
        weight = layer.base_layer.weight
        if a.shape[0]:
            compute = torch.promote_types(weight.dtype, torch.float32)
            update = (b.to(compute) @ a.to(compute)) * layer.scaling
            weight.add_((update.t() if _KINDS[layer.kind][1] else update).to(weight.dtype))
        _replace(model, name, layer.base_layer)
    del model._sora
    return model


def _exact_alpha(scaling: float, rank: int) -> float:
    """An α with α / rank == scaling in float64, so that PEFT's scaling (lora_alpha / r) is ours bit for bit.
    Division can step over `scaling` (e.g. no float64 α has α / 25 == 2/3); then the nearest, 1 ulp off."""
    alpha = scaling * rank
    candidates = [alpha]
    for direction in (math.inf, -math.inf):
        a = alpha
        for _ in range(4):
            a = math.nextafter(a, direction)
            candidates.append(a)
    return min(candidates, key=lambda a: (abs(a / rank - scaling), abs(a - alpha)))


def export_peft(
    model: nn.Module, directory: str | os.PathLike, base_model_name_or_path: str | None = None
) -> dict[str, int]:
    """Write the pruned adapter as a PEFT LoRA adapter that `peft.PeftModel.from_pretrained(base, directory)`
    loads unchanged (the model itself is not changed).

    Each surviving layer gets its rank nnz(g) in `rank_pattern` and α′ = α·nnz/r in `alpha_pattern`, so
    PEFT's scaling α′/nnz equals α/r (bit for bit where float64 allows, else to 1 ulp); pattern keys are escaped full module names, longest first
    (PEFT takes the first key that matches a name's end). A layer whose gates all died is left out
    (its branch adds 0; PEFT leaves that layer alone). The densely trained modules go in `modules_to_save`.

    Returns:
        The exported rank of each kept layer.
    """
    state = _state(model)
    config = state.config
    tensors, kept, kinds = {}, {}, set()
    for name, layer in layers(model).items():
        a, b = pruned_factors(layer)
        if a.shape[0] == 0:
            continue
        tensors[f"base_model.model.{name}.lora_A.weight"] = a.contiguous().cpu()
        tensors[f"base_model.model.{name}.lora_B.weight"] = b.contiguous().cpu()
        kept[name] = (a.shape[0], layer.scaling)
        kinds.add(layer.kind)
    if not kept:
        raise ValueError(
            "every gate of every layer is zero, so there is no low-rank adapter to export; export an earlier "
            "stage's checkpoint (smaller ξ), or use sora.merge(model) for the base with its densely trained modules"
        )
    for path, param in _saved_parameters(model, state.saved).items():
        tensors[f"base_model.model.{path}"] = param.detach().contiguous().cpu()
    order = sorted(kept, key=len, reverse=True)
    peft_config = {
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": base_model_name_or_path,
        "r": config.r,
        "lora_alpha": config.lora_alpha,
        "lora_dropout": config.lora_dropout,
        "target_modules": "|".join(re.escape(n) for n in order),  # a regex string: PEFT full-matches it
        "rank_pattern": {re.escape(n): kept[n][0] for n in order},
        "alpha_pattern": {re.escape(n): _exact_alpha(kept[n][1], kept[n][0]) for n in order},
        "modules_to_save": state.saved or None,
        "fan_in_fan_out": kinds == {"conv1d"},  # PEFT corrects it per layer (with a warning) in mixed models
        "bias": "none",
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "inference_mode": True,
    }
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    atomic_write(directory / PEFT_WEIGHTS_FILE, lambda tmp: save_file(tensors, str(tmp), metadata={"format": "pt"}))
    text = json.dumps(peft_config, indent=2) + "\n"
    atomic_write(directory / PEFT_CONFIG_FILE, lambda tmp: tmp.write_text(text))
    return {n: kept[n][0] for n in kept}


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
        raise ValueError(f"{path} cannot be read as a SoRA state (truncated or corrupted?): {e}") from e
    if metadata.get("format") != FORMAT:
        raise ValueError(f"{path} is not a SoRA state written by sora.save (format={metadata.get('format')!r})")
    if metadata.get("format_version") != str(FORMAT_VERSION):
        raise ValueError(
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
        raise ValueError(
            f"the saved SoRA state does not fit this model (layers only here: {extra[:3]}, only in the state: "
            f"{lacking[:3]}); load it onto the base model it was trained on"
        )
    for name, layer in found.items():
        a, b, g = (tensors[f"{name}.{part}"] for part in ("lora_A", "lora_B", "gate"))
        if a.shape[1] != layer.lora_A.shape[1] or b.shape[0] != layer.lora_B.shape[0]:
            raise ValueError(
                f"layer {name} is {tuple(layer.lora_B.shape[:1]) + tuple(layer.lora_A.shape[1:])} (out, in) here but "
                f"({b.shape[0]}, {a.shape[1]}) in the state; load it onto the base model it was trained on"
            )
        for attr, value in (("lora_A", a), ("lora_B", b), ("gate", g)):
            setattr(layer, attr, nn.Parameter(value.to(getattr(layer, attr)), requires_grad=True))
    params = dict(model.named_parameters())
    for path in info["saved_tensors"]:
        if path not in params or params[path].shape != tensors[path].shape:
            found_shape = tuple(params[path].shape) if path in params else "nothing"
            raise ValueError(
                f"densely trained tensor {path} {tuple(tensors[path].shape)} has no match in this model ({found_shape}); "
                "build the model as for training (e.g. the same num_labels)"
            )
        params[path].copy_(tensors[path])
    return model


# -- the sparsifying scheduler (the paper's Algorithm 1) -------------------------------------------
def xi_schedule(kind: str, start: float, stop: float, stages: int) -> list[float]:
    """ξ for each stage, from `start` to `stop`, named as in the official code:
    "linear": evenly spaced; "log_linear": log of evenly spaced e^ξ (dense near `stop`);
    "exp_linear": exp of evenly spaced log ξ, a geometric grid (needs start > 0).

    Returns:
        A strictly increasing list of `stages` values (start first, stop last).
    """
    if kind not in GRIDS:
        raise ValueError(f"unknown ξ grid {kind!r}; choose from {list(GRIDS)}")
    if isinstance(stages, bool) or not isinstance(stages, int) or stages < 1:
        raise ValueError(f"stages must be an integer >= 1, got {stages!r}")
    _check_non_negative("start", start)
    _check_non_negative("stop", stop)
    if stages == 1:
        return check_schedule([start])
    if not stop > start:
        raise ValueError(f"stop must be greater than start for an increasing grid, got start={start:g}, stop={stop:g}")
    steps = torch.linspace(0, 1, stages, dtype=torch.float64)
    if kind == "linear":
        values = start + (stop - start) * steps
    elif kind == "log_linear":
        if stop > 700:
            raise ValueError(f"the log_linear grid needs e^stop, which overflows for stop={stop:g}; use 'linear'")
        values = torch.log(math.exp(start) + (math.exp(stop) - math.exp(start)) * steps)
    else:
        if start == 0:
            raise ValueError(
                "the exp_linear grid is geometric and cannot start at ξ = 0 (log 0); use start > 0 or 'linear'"
            )
        values = torch.exp(math.log(start) + (math.log(stop) - math.log(start)) * steps)
    values = values.tolist()
    values[0], values[-1] = float(start), float(stop)  # exactly the ends asked for
    return check_schedule(values)


@dataclass
class Stage:
    """One sparsifying stage: its ξ, the caller's metrics, the nonzero gates, the checkpoint."""

    index: int
    xi: float
    metrics: dict
    gates: dict[str, int]
    checkpoint: str | None = None

    @property
    def nonzero(self) -> int:
        return sum(self.gates.values())

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "nonzero": self.nonzero}


def sparsify(
    model: nn.Module,
    schedule: list[float] | None,
    make_optimizer: Callable,
    train_fn: Callable,
    directory: str | os.PathLike | None = None,
    checkpoint_fn: Callable | None = None,
) -> list[Stage]:
    """Algorithm 1: train once per ξ of `schedule` (each stage raises ξ and continues from the last),
    each stage with a FRESH optimizer and learning-rate schedule, recording metrics and nonzero gates.

    Args:
        schedule: increasing ξ per stage (None: the config's schedule, else one stage at its ξ).
        make_optimizer: `make_optimizer(model) -> (optimizer, lr_scheduler or None)`, called once per stage;
            build the optimizer from `param_groups(model, ...)`. The proximal step is hooked onto it here.
        train_fn: `train_fn(model, optimizer, lr_scheduler, stage_index) -> dict of metrics (or None)`: the
            caller's training loop for one stage (forward, loss + l1_penalty(model), backward, optimizer.step(),
            lr_scheduler.step()).
        directory: if given, each stage is saved (`save`) under `directory/stage-<i>` and a summary is kept in
            `directory/stages.json`.
        checkpoint_fn: instead, `checkpoint_fn(model, stage) -> path or None` to save a stage your way.

    Returns:
        One `Stage` per ξ; pick the sparsity/accuracy trade-off from them and load that checkpoint.
    """
    config = config_of(model)
    schedule = check_schedule(schedule if schedule is not None else (config.schedule or [config.xi]))
    stages, previous = [], None
    for index, xi in enumerate(schedule):
        set_xi(model, xi)
        made = make_optimizer(model)
        optimizer, scheduler = made if isinstance(made, tuple) else (made, None)
        if optimizer is previous:
            raise ValueError(
                "make_optimizer returned the previous stage's optimizer; build a new one (and a new lr schedule) "
                "every stage: reusing an exhausted schedule trains later stages at lr 0"
            )
        handle = proximal_hook(model, optimizer)
        try:
            metrics = train_fn(model, optimizer, scheduler, index) or {}
        finally:
            handle.remove()
        previous = optimizer
        stage = Stage(index, xi, dict(metrics), gate_counts(model))
        if checkpoint_fn is not None:
            path = checkpoint_fn(model, stage)
            stage.checkpoint = None if path is None else str(path)
        elif directory is not None:
            stage.checkpoint = str(save(model, Path(directory) / f"stage-{index}").parent)
        stages.append(stage)
        if directory is not None:
            text = json.dumps([s.to_dict() for s in stages], indent=2) + "\n"
            Path(directory).mkdir(parents=True, exist_ok=True)
            atomic_write(Path(directory) / "stages.json", lambda tmp, text=text: tmp.write_text(text))
    return stages
