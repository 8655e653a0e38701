"""Diff Pruning (Guo, Rush & Kim, ACL 2021, arXiv 2012.07463): learn which entries to change.

Phase 1, the dense L0 phase: every targeted tensor θ gets a diff δ = z ⊙ w with w (init 0) and a
Hard-Concrete mask z with learnable logits α (init 5); the loss gains λ·E[‖δ‖₀]. Phase 2: the
diff is projected to its k largest |δ| and fine-tuned further as an ordinary sparse delta of the
core (fixed mask, k-sized optimizer state), which saves and loads like any other delta.

Usage (loop-agnostic: the caller owns the training loop, as for the core)::

    from sparsedelta import diff_pruning as dp
    config = dp.DiffPruningConfig(density=0.005, modules_to_save=["classifier"])
    dp.start(model, config)                          # θ frozen; w, α per targeted tensor
    opt = torch.optim.AdamW(dp.param_groups(model))  # w at 1e-5, α at 0.1, the head at lr_head
    for batch in batches:                            # model.train(): a fresh mask per optimizer step
        loss = model(**batch).loss + dp.penalty(model)
        loss.backward(); opt.step(); opt.zero_grad()
    dp.project(model)                                # -> a core sparse delta with k entries
    opt = torch.optim.AdamW(sparsedelta.trainable_parameters(model), lr=dp.PAPER_LR_PHASE2)
    ...                                              # phase 2: the same loop without the penalty
    sparsedelta.save(model, "out/")

Where each formula lives: `hard_concrete` (the sampler and the deterministic evaluation mask),
`prob_zero` / `prob_one` / `prob_nonzero` (its closed forms), `expected_l0` (the penalty term),
`structured_expected_l0` (the structured penalty), `project_positions` (the magnitude projection).
Other verbs: `penalty(model)` (λ·expected L0, add it to the loss), `expected_nonzeros(model)` (for
logs), `param_groups`, `resample(model)` (force fresh noise), `fixed_noise(model)` (pin it),
`eval_deltas(model)`, `discard(model)` (drop phase 1, the base model is unchanged).

Choices, and why:
- Noise: one u per entry per optimizer step, shared by the whole batch and by every
  gradient-accumulation micro-batch. A new step is noticed without any call: the noise advances
  when an optimizer has changed w or α since the last sampled forward. The noise of step t is a
  pure function of (seed, tensor, t), so it is regenerated rather than stored, resumed runs draw
  the same masks, and every DDP rank draws the same mask.
- Mask: sampled in `model.train()` mode; in `model.eval()` mode the evaluation mask, by default
  the deterministic z = min(1, max(0, σ(α)(r−l)+l)); `eval_mask="sampled"` takes the paper's one
  sampled mask (fixed by `eval_seed`). The projection uses the evaluation mask, and the choice is
  saved with the delta's config.
- Memory and time: θ stays in the module's own weight (no copy). A layer's θ + δ is a per-layer
  temporary: the forward computes it and lets it go (linear layers keep only their input; a
  layer whose own backward needs its weight, e.g. a LayerNorm, keeps θ + δ until then); the
  backward recomputes the mask (elementwise, in slices of about CHUNK entries) and differentiates
  it by autograd, from the noise its forward kept (drawing it again would cost more time than the
  4 bytes per entry; embeddings redraw theirs). An embedding computes θ + δ only for the rows its
  batch looks up. So a step holds w, α, their gradients and optimizer state, and never every
  layer's mask intermediates at once.
  Measured against full fine-tuning by bench/diff_pruning_memory.py.
- Call `start` before wrapping the model in DDP, and wrap it anew after `project` (the trainable
  tensors change).
- Phase-2 values start from z⊙w, the diff phase 1 actually applied (`init_from="delta"`), so
  projecting at density 1 changes nothing and a smaller density only drops the smallest entries.
  The official code restarts from w, which silently rescales every kept entry whose z was in
  (0, 1); `init_from="w"` reproduces that.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ...core import patching
from ...core.adapters import add_delta, dense_copies, install_tensors, module_parameters, state_of
from ...core.config import SelectionReport
from ...core.selection import smallest_fraction, smallest_k
from ...core.targeting import find_targets
from ...errors import UsageError
from .config import DiffPruningConfig
from .diff_vector import GROUPS, DiffVector
from .hard_concrete import (
    NOISE_EPS,
    expected_l0,
    hard_concrete,
    log_ratio,
    logistic_noise,
    prob_nonzero,
    prob_one,
    prob_zero,
    structured_expected_l0,
)
from .layers import LAYER_KEY, bind

PAPER_LR_W = 1e-5  # AdamW on w (paper, linear decay)
PAPER_LR_ALPHA = 0.1  # AdamW on α (constant in the official code)
PAPER_LR_PHASE2 = 5e-5  # fixed-mask fine-tuning
CONTAINER = "diff_pruning"  # attribute under which a module holds its phase-1 tensors

__all__ = [
    "GROUPS", "NOISE_EPS", "PAPER_LR_ALPHA", "PAPER_LR_PHASE2", "PAPER_LR_W", "DiffPruningConfig", "DiffVector",
    "discard", "eval_deltas", "expected_l0", "expected_nonzeros", "fixed_noise", "hard_concrete", "log_ratio",
    "logistic_noise", "num_targeted", "param_groups", "penalty", "phase_one", "prob_nonzero", "prob_one",
    "prob_zero", "project", "project_positions", "resample", "start", "structured_expected_l0",
]  # fmt: skip


# -- phase 1 on a model --------------------------------------------------------------------------------
@dataclass
class PhaseOne:
    config: DiffPruningConfig
    diffs: dict[str, DiffVector]  # by parameter path
    owners: dict[str, list[tuple[nn.Module, str]]]
    head: dict[str, nn.Parameter]  # densely trained modules_to_save tensors, by parameter path
    head_originals: dict[str, nn.Parameter]


def phase_one(model: nn.Module) -> PhaseOne:
    state = getattr(model, "_diff_pruning", None)
    if state is None:
        raise UsageError(
            "no Diff Pruning phase 1 on this model: call diff_pruning.start(model, config) and train it first "
            "(projection needs the trained w and α)"
        )
    return state


def start(model: nn.Module, config: DiffPruningConfig) -> nn.Module:
    """Phase 1: give every targeted tensor w = 0 and α = alpha_init, freeze θ (everything else),
    and train modules_to_save densely (on a copy, so the base model stays intact)."""
    if not isinstance(config, DiffPruningConfig):
        raise TypeError(f"diff_pruning.start needs a DiffPruningConfig, got {type(config).__name__}")
    if getattr(model, "_diff_pruning", None) is not None:
        raise UsageError("Diff Pruning phase 1 is already running on this model; project() or discard() it first")
    core = getattr(model, "_sparsedelta", None)
    if core is not None and core.active is not None and core.merged:
        raise UsageError(
            f"sparse delta {core.active!r} is merged into this model; phase 1 must start from the base weights: "
            "call sparsedelta.set_adapter(model, None) first"
        )
    targets, saved_modules = find_targets(model, config)
    for p in model.parameters():
        p.requires_grad_(False)
    diffs, owners = {}, {}
    for stream, (path, target) in enumerate(targets.items()):
        diff = DiffVector(target.param, config, stream, row_blocks=target.kind == "embedding")
        owner, pname = target.owners[0]
        if CONTAINER not in owner._modules:
            owner.add_module(CONTAINER, nn.ModuleDict())
        owner._modules[CONTAINER][pname] = diff
        for module, owned_name in target.owners:
            bind(module, owned_name, diff)
        diffs[path], owners[path] = diff, target.owners
    originals = module_parameters(model, saved_modules)
    head = dense_copies(originals)
    install_tensors(model, head)
    model._diff_pruning = PhaseOne(config, diffs, owners, head, originals)
    return model


def param_groups(
    model: nn.Module, lr_w: float = PAPER_LR_W, lr_alpha: float = PAPER_LR_ALPHA, lr_head: float | None = None
) -> list[dict]:
    """Optimizer groups for phase 1: w, the logits α (and α_g), the dense head (lr_head, default lr_w).
    No weight decay anywhere, as in the paper; every group has a "name"; α's has "constant_lr" (the
    training loop leaves its rate out of the schedule, as the official code does)."""
    state = phase_one(model)
    groups = [
        {"name": "w", "params": [d.w for d in state.diffs.values()], "lr": lr_w, "weight_decay": 0.0},
        {
            "name": "alpha",
            "params": [p for d in state.diffs.values() for p in d.leaves()[1:]],
            "lr": lr_alpha,
            "weight_decay": 0.0,
            "constant_lr": True,  # the official code keeps α's rate constant while w's decays
        },
    ]
    if state.head:
        lr = lr_w if lr_head is None else lr_head
        groups.append({"name": "head", "params": list(state.head.values()), "lr": lr, "weight_decay": 0.0})
    return groups


def penalty(model: nn.Module) -> torch.Tensor:
    """λ·E[‖δ‖₀] over every targeted tensor (structured: the paper's product form); add it to the loss.
    Each tensor's term is recomputed in backward instead of keeping its σ(α − c) across the step."""
    state = phase_one(model)
    if state.config.l0_penalty == 0:
        return torch.zeros((), device=next(iter(state.diffs.values())).w.device)
    total = sum(_checkpointed(d.penalty_term) for d in state.diffs.values())
    return state.config.l0_penalty * total


def _checkpointed(fn):
    return checkpoint(fn, use_reentrant=False) if torch.is_grad_enabled() else fn()


def expected_nonzeros(model: nn.Module) -> float:
    """E[‖δ‖₀] (unweighted), e.g. to log the expected density during phase 1."""
    with torch.no_grad():
        return float(sum(d.penalty_term() for d in phase_one(model).diffs.values()))


def num_targeted(model: nn.Module) -> int:
    return sum(math.prod(d.shape) for d in phase_one(model).diffs.values())


def resample(model: nn.Module) -> None:
    """Draw fresh noise at the next sampled forward (only needed to force it; optimizer steps do it)."""
    with torch.no_grad():
        for d in phase_one(model).diffs.values():
            d.noise_step.add_(1)


@contextlib.contextmanager
def fixed_noise(model: nn.Module):
    """Keep the current noise even when w or α change (gradient checks, line searches)."""
    diffs = list(phase_one(model).diffs.values())
    for d in diffs:
        d.pinned = True
    try:
        yield model
    finally:
        for d in diffs:
            d.pinned = False


def eval_deltas(model: nn.Module) -> dict[str, torch.Tensor]:
    """δ = z ⊙ w under the evaluation mask, per targeted tensor (what projection ranks)."""
    return {path: d.delta(None) for path, d in phase_one(model).diffs.items()}


# -- projection and phase 2 ----------------------------------------------------------------------------
def project_positions(
    deltas: dict[str, torch.Tensor], count: int | None = None, density: float | None = None, per_tensor: bool = False
) -> dict[str, torch.Tensor]:
    """The k largest |δ| (flat positions per tensor): exactly `count`, or round(density·n) over all
    tensors together (per_tensor: within each tensor). Ties are broken by order, so the count is exact."""
    scores = {n: -d.detach().abs() for n, d in deltas.items()}
    total = sum(d.numel() for d in deltas.values())
    if count is not None:
        if per_tensor:
            raise UsageError("count is one global budget; use density with per_tensor=True")
        if not 1 <= count <= total:
            raise UsageError(f"count must lie in [1, {total:,}] (the targeted entries), got {count}")
        return smallest_k(scores, count)
    return smallest_fraction(scores, density, per_tensor)


def project(
    model: nn.Module,
    density: float | None = None,
    count: int | None = None,
    per_tensor: bool | None = None,
    adapter_name: str = "default",
    init_from: str | None = None,
) -> nn.Module:
    """End phase 1: keep the k largest |δ| (evaluation mask) and continue as a core sparse delta
    named `adapter_name` (trainable, active) at those positions; the head keeps its phase-1 values.
    Arguments left None come from the config; the saved config records the ones used."""
    state = phase_one(model)
    changes = {"density": density, "count": None} if density is not None else {}
    changes.update(
        {k: v for k, v in (("count", count), ("per_tensor", per_tensor), ("init_from", init_from)) if v is not None}
    )
    config = dataclasses.replace(state.config, **changes)  # validated like the config itself
    deltas = eval_deltas(model)
    if not any(bool(d.any()) for d in deltas.values()):
        raise UsageError(
            "every δ = z*w is still 0, so there is nothing to project: phase 1 has not trained yet "
            "(w starts at 0); run optimizer steps on diff_pruning.param_groups(model) first"
        )
    positions = project_positions(deltas, config.count, None if config.count else config.density, config.per_tensor)
    source = deltas if config.init_from == "delta" else {n: d.w.detach() for n, d in state.diffs.items()}
    values = {n: source[n].reshape(-1)[p] for n, p in positions.items() if len(p)}
    positions = {n: p for n, p in positions.items() if len(p)}
    per = {n: len(p) for n, p in positions.items()}
    how = (
        f"count {config.count}"
        if config.count
        else f"density {config.density}" + (" per tensor" if config.per_tensor else "")
    )
    report = SelectionReport(
        f"Diff Pruning: largest |z*w| ({config.eval_mask} mask) at {how}", sum(per.values()), num_targeted(model), per
    )
    head = {path: p.detach().clone() for path, p in state.head.items()}
    discard(model)
    add_delta(model, config, positions, adapter_name, values=values, report=report)
    with torch.no_grad():
        for path, param in state_of(model).adapters[adapter_name].saved.items():
            param.copy_(head[path])
    return model


def discard(model: nn.Module) -> nn.Module:
    """Remove phase 1 (w, α, the head copy); the model is the base model again."""
    state = phase_one(model)
    for owners in state.owners.values():
        for module, _ in owners:
            patching.unwrap(module, LAYER_KEY)
            module._modules.pop(CONTAINER, None)
    install_tensors(model, state.head_originals)
    del model._diff_pruning
    return model
