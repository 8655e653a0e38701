"""SaRA (Hu et al., ICLR 2025, arXiv 2409.06633): train the "ineffective" small weights.

- mask: M = |θ| < threshold, one absolute threshold over every targeted tensor (or, our addition,
  the k smallest |θ| for a target density, globally or per tensor);
- only θ⊙M changes (the core guarantees it: only those positions exist in the delta);
- low-rank penalty λ_rank·‖θ⊙M‖_* on the masked *current* weights, one random eligible matrix per
  step (min side > 64) or all of them; unlike the official code it reaches the optimizer;
- progressive re-selection: M_new = M_old ∧ (|θ_current| < threshold); leavers freeze at their
  trained values and the optimizer state of the survivors is kept (our option `reselect_rule=
  "relative"`: keep the entries whose |θ_current| is still among the smallest k_t of their tensor,
  k_t the count first selected there, since the absolute rule froze almost every entry when trained
  values outgrew a tiny threshold);
- default learning rate 1e-3·exp(−350·threshold).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field

import torch
from torch import nn

from ..core import single_thread
from ..core.adapters import state_of
from ..core.config import DeltaConfig, SelectionReport
from ..core.delta import SparseDelta
from ..core.selection import below, check_density, scores_of, smallest_fraction
from ..errors import UsageError
from .base import DeltaRunner, active_adapter
from .registry import register_method

MIN_SIDE = 64  # matrices whose smaller side is at most this get no low-rank penalty (paper)


def default_lr(threshold: float) -> float:
    """The paper's rule for the learning rate when none is given."""
    return 1e-3 * math.exp(-350 * threshold)


DEFAULT_THRESHOLD = 1e-3  # |θ| below it is trained when no budget is given


@dataclass
class SaRAConfig(DeltaConfig):
    """SaRA's selection rule and training extras (targeting fields: see DeltaConfig)."""

    method = "sara"
    threshold: float | None = field(default=None, metadata={
        "help": f"train |θ| < threshold (default {DEFAULT_THRESHOLD:g} when no density is given)"})  # fmt: skip
    density: float | None = field(default=None, metadata={
        "help": "instead, train the round(density·n) smallest |θ| (our addition; the paper has a threshold)"})  # fmt: skip
    per_tensor: bool = field(default=False, metadata={"help": "with density: the budget within each tensor, not over all"})  # fmt: skip
    rank_penalty: float = field(default=5e-4, metadata={
        "help": "λ_rank of the nuclear-norm term λ·‖θ⊙M‖_* (paper's scripts 5e-4; 0 turns it off)"})  # fmt: skip
    rank_penalty_scope: str = field(default="random", metadata={
        "help": "'random': one eligible matrix (min side > 64) per step, as the paper; 'all': every one"})  # fmt: skip
    reselect_step: int | None = field(default=None, metadata={
        "help": "optimizer step of the one progressive re-selection, M ∧ (|θ_now| < threshold) (None: never)"})  # fmt: skip
    reselect_rule: str = field(default="absolute", metadata={
        "help": "'absolute': keep |θ_now| < threshold (paper); 'relative': keep the entries still among the "
                "smallest |θ_now| of their tensor, as many as were first selected there"})  # fmt: skip

    def __post_init__(self):
        super().__post_init__()
        if self.threshold is None and self.density is None:
            self.threshold = DEFAULT_THRESHOLD
        if self.threshold is not None and self.density is not None:
            raise UsageError("give SaRA either a threshold or a density, not both")
        if self.threshold is not None and not self.threshold > 0:
            raise UsageError(f"threshold must be > 0, got {self.threshold}; SaRA's paper uses about 5e-4 to 2e-3")
        if self.density is not None:
            check_density(self.density)
        if self.rank_penalty < 0:
            raise UsageError(f"rank_penalty must be >= 0, got {self.rank_penalty}")
        if self.rank_penalty_scope not in ("random", "all"):
            raise UsageError(f"rank_penalty_scope must be 'random' or 'all', got {self.rank_penalty_scope!r}")
        if self.reselect_rule not in ("absolute", "relative"):
            raise UsageError(f"reselect_rule must be 'absolute' or 'relative', got {self.reselect_rule!r}")

    @property
    def default_lr(self) -> float:
        return default_lr(self.threshold if self.threshold is not None else 0.0)

    def select(self, tensors):
        scores = scores_of(tensors, torch.abs)
        eligible = sum(t.numel() for t in tensors.values())
        if self.density is not None:
            positions = smallest_fraction(scores, self.density, self.per_tensor)
            rule = f"SaRA: smallest |θ| at density {self.density}" + (" per tensor" if self.per_tensor else "")
        else:
            positions = below(scores, self.threshold)
            rule = f"SaRA: |θ| < {self.threshold:g}"
        per = {n: len(p) for n, p in positions.items()}
        if sum(per.values()) == 0:
            smallest = min(float(s.min()) for s in scores.values())
            raise UsageError(
                f"threshold {self.threshold:g} selects no entry of {eligible:,} targeted ones (smallest |θ| is "
                f"{smallest:.3g}); raise the threshold or give a density instead"
            )
        return positions, SelectionReport(rule, sum(per.values()), eligible, per)


def _active_deltas(model: nn.Module) -> dict[str, SparseDelta]:
    state = state_of(model)
    if state.active is None:
        raise UsageError("no active adapter; call sparsedelta.set_adapter(model, name) first")
    return state.adapters[state.active].deltas


def penalty_matrices(model: nn.Module) -> list[str]:
    """Names of the active deltas eligible for the low-rank penalty: 2-D, min side > 64."""
    return [
        n for n, d in _active_deltas(model).items() if len(d.shape) == 2 and min(d.shape) > MIN_SIDE and len(d.indices)
    ]


def masked_weight(delta: SparseDelta) -> torch.Tensor:
    """θ⊙M as a dense matrix, differentiable with respect to the delta's values."""
    current = delta.current_values()
    dense = current.new_zeros(math.prod(delta.shape)).scatter(0, delta.indices, current)
    return dense.view(delta.shape)


class NuclearNorm(torch.autograd.Function):
    """‖A‖_* and its (sub)gradient U Vᵀ through the eigen-decomposition of the small Gram matrix AᵀA in
    float64: a few times faster on CPU than an SVD with autograd, exact up to float64 rounding. Directions
    with (numerically) zero singular value get a zero subgradient."""

    @staticmethod
    def forward(ctx, matrix):
        x = matrix.double()
        wide = x.shape[0] < x.shape[1]
        if wide:
            x = x.t()
        evals, v = single_thread.run(torch.linalg.eigh, x.t() @ x)  # faster than on all cores
        sigma = evals.clamp_min(0).sqrt()
        inverse = torch.where(sigma > sigma.max() * 1e-7, 1 / sigma, torch.zeros_like(sigma))
        grad = x @ (v * inverse) @ v.t()  # = U Vᵀ on the range of x
        ctx.save_for_backward((grad.t() if wide else grad).to(matrix.dtype))
        return sigma.sum().to(matrix.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        (grad,) = ctx.saved_tensors
        return grad_out * grad


def rank_penalty(
    model: nn.Module, weight: float, scope: str = "random", rng: random.Random | None = None
) -> torch.Tensor:
    """λ_rank·Σ‖θ⊙M‖_* over one random eligible matrix ("random") or all of them ("all").
    Add it to the loss before backward. The matrix is drawn from `rng`, else from the model's own
    generator (seeded, in the model's delta state), never from the process-wide `random`."""
    deltas = _active_deltas(model)
    names = penalty_matrices(model)
    if weight == 0 or not names:
        return torch.zeros((), device=next(iter(deltas.values())).values.device)
    if scope == "random":
        names = [(rng or state_of(model).rng).choice(names)]
    total = sum(NuclearNorm.apply(masked_weight(deltas[n])) for n in names)
    return weight * total


def reselect(model: nn.Module, threshold: float, optimizer: torch.optim.Optimizer | None = None) -> SelectionReport:
    """Progressive re-selection: keep training only the entries whose current |θ| < threshold.
    The others stay merged at their trained values. Optimizer state of the survivors is kept."""
    per = {}
    before = 0
    for name, delta in _active_deltas(model).items():
        before += len(delta.indices)
        keep = delta.current_values().detach().abs() < threshold
        old_len = len(delta.values)
        if optimizer is not None:
            _slice_optimizer_state(optimizer, delta.values, keep, old_len)
        delta.freeze_entries(keep)
        per[name] = int(keep.sum())
    return SelectionReport(f"SaRA re-selection: |θ| < {threshold:g}", sum(per.values()), before, per)


def reselect_relative(model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> SelectionReport:
    """Relative re-selection: in each tensor holding k delta entries, keep training those whose current
    |θ| is still among the k smallest of the whole current tensor (trained entries and untouched θ)."""
    per, before = {}, 0
    for name, delta in _active_deltas(model).items():
        k = len(delta.indices)
        before += k
        current = delta.current_values().detach()
        whole = delta.dense_weight().reshape(-1).to(current.dtype).clone()  # θ elsewhere, merged or not
        whole[delta.frozen_indices] = delta.frozen_base.to(current.dtype) + delta.frozen_values.to(current.dtype)
        whole[delta.indices] = current
        limit = whole.abs().kthvalue(k).values if k else current.new_zeros(())
        keep = current.abs() <= limit
        if optimizer is not None:
            _slice_optimizer_state(optimizer, delta.values, keep, k)
        delta.freeze_entries(keep)
        per[name] = int(keep.sum())
    return SelectionReport("SaRA re-selection: |θ| among the smallest of its tensor", sum(per.values()), before, per)


def _slice_optimizer_state(
    optimizer: torch.optim.Optimizer, param: torch.Tensor, keep: torch.Tensor, old_len: int
) -> None:
    state = optimizer.state.get(param)
    if not state:
        return
    for key, value in state.items():
        if torch.is_tensor(value) and value.dim() == 1 and len(value) == old_len:
            state[key] = value[keep]


# -- the runner ------------------------------------------------------------------------------------
@register_method
class SaRARunner(DeltaRunner):
    """SaRA: train the smallest |θ|; nuclear-norm penalty in the loss; optional one-off re-selection."""

    name = "sara"
    summary = "SaRA (Hu et al., ICLR 2025, arXiv 2409.06633): train the small |θ|, low-rank penalty, re-selection"
    config_class = SaRAConfig
    config: SaRAConfig
    # 40 steps of SmolLM2 on the KJV want a large lr: validation perplexity 30.9 before, after 40 steps
    # 25.1 at lr 2e-3, 23.2 at 4e-3, 21.8 at 8e-3, 21.3 at 1.6e-2
    # the diffusion default (digits 0-4 -> 5-9, 300 steps): validation loss 0.02944 at 5e-3, 0.02875 at 2e-2, 0.02923 at 5e-2
    lrs = {"causal-lm": 1e-2, "diffusion": 2e-2}

    def __init__(self, settings):
        super().__init__(settings)
        self.reselected = False

    def budget_fields(self, model, targeting):
        return {"threshold": self.settings.threshold, "density": self.settings.density}

    def default_lr(self, task):
        if task in self.lrs:
            return self.lrs[task]
        if hasattr(self, "config"):
            return self.config.default_lr
        return SaRAConfig(threshold=self.settings.threshold).default_lr

    def extra_loss(self, model, step):
        if self.config.rank_penalty == 0 or not penalty_matrices(model):  # no term to differentiate
            return None
        return rank_penalty(model, self.config.rank_penalty, self.config.rank_penalty_scope, self.rng)

    def resizes_parameters(self):
        return self.config.reselect_step is not None

    def on_step(self, model, step, optimizer):
        due = self.config.reselect_step is not None and step >= self.config.reselect_step
        if not due or self.reselected:  # at the first step taken from reselect_step on (fp16 may skip it)
            return None
        self.reselected = True
        if self.config.reselect_rule == "relative":
            return str(reselect_relative(model, optimizer))
        threshold = self.config.threshold
        if threshold is None:  # a density budget: the equivalent threshold is the largest selected |θ|
            threshold = max(float(d.base.abs().max()) for d in active_adapter(model).deltas.values() if len(d.base))
            threshold = math.nextafter(threshold, math.inf)
        return str(reselect(model, threshold, optimizer))

    def state_dict(self, model):
        return {**super().state_dict(model), "reselected": self.reselected}

    def load_state_dict(self, model, state):
        super().load_state_dict(model, state)
        self.reselected = state.get("reselected", False)
