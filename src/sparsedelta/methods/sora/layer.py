"""The gated low-rank branch of one linear layer, and attaching branches to a model."""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ...core.targeting import check_patterns_match, matches
from ...errors import UsageError
from .config import SoRAConfig


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
        raise UsageError(
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
        check_patterns_match(getattr(config, option), names, option)
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
        raise UsageError(
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
        raise UsageError("this model already has SoRA layers; attach to a fresh base model (or use sora.merge first)")
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




@contextlib.contextmanager
def disabled(model: nn.Module):
    """Run the base model: every branch adds 0 while the gates are set to 0 (restored afterwards).
    The densely trained modules keep their trained values."""
    found = layers(model)
    kept = {n: m.gate.detach().clone() for n, m in found.items()}
    with torch.no_grad():
        for m in found.values():
            m.gate.zero_()
    try:
        yield model
    finally:
        with torch.no_grad():
            for n, m in found.items():
                m.gate.copy_(kept[n])
