"""Training SoRA's gates: optimizer groups, the L1 term, the soft threshold and the proximal step."""

from __future__ import annotations

import torch
from torch import nn

from ...errors import UsageError
from .config import GATE_GROUP
from .layer import _saved_parameters, _state, config_of, layers


# -- training: parameter groups, penalty, proximal step --------------------------------------------
def param_groups(
    model: nn.Module,
    lr: float,
    gate_lr: float | None = None,
    weight_decay: float | None = 0.0,
    head_lr: float | None = None,
) -> list[dict]:
    """Optimizer groups: A and B; the densely trained matrices and the 1-D densely trained tensors
    (biases, norms: no weight decay); the gates (group "sora_gates": own lr, no weight decay).

    Args:
        lr: the learning rate of A and B.
        gate_lr: the gates' learning rate (default: the config's gate_lr, else lr).
        weight_decay: for A, B and the densely trained matrices (None: the optimizer's own default).
        head_lr: the densely trained tensors' learning rate (default lr).

    Returns:
        A list of parameter-group dicts for any torch optimizer (empty groups left out).
    """
    state = _state(model)
    gate_lr = gate_lr if gate_lr is not None else (state.config.gate_lr if state.config.gate_lr is not None else lr)
    head_lr = lr if head_lr is None else head_lr
    decay = {} if weight_decay is None else {"weight_decay": weight_decay}
    low_rank = [p for m in layers(model).values() for p in (m.lora_A, m.lora_B)]
    dense = [p for p in _saved_parameters(model, state.saved).values() if p.requires_grad]
    groups = [
        {"params": low_rank, "lr": lr, **decay},
        {"params": [p for p in dense if p.dim() >= 2], "lr": head_lr, **decay},
        {"params": [p for p in dense if p.dim() < 2], "lr": head_lr, "weight_decay": 0.0},
        {"params": [m.gate for m in layers(model).values()], "lr": gate_lr, "weight_decay": 0.0, "name": GATE_GROUP},
    ]
    return [g for g in groups if g["params"]]


def soft_threshold(g: torch.Tensor, t: float) -> torch.Tensor:
    """T_t(g) = sign(g)·max(|g| − t, 0): the proximal operator of t·‖g‖₁."""
    if not t >= 0:
        raise UsageError(f"the soft threshold must be >= 0, got {t!r}")
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
        raise UsageError(
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


