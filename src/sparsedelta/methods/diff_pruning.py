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
import types
from dataclasses import dataclass

import torch
from torch import nn
from torch.autograd import Function
from torch.utils.checkpoint import checkpoint

from ..core.adapters import add_delta, state_of
from ..core.config import PARAMETER_KINDS, DeltaConfig, SelectionReport
from ..core.ops import linear
from ..core.selection import budget, check_density, smallest_k
from ..core.targeting import find_targets

PAPER_LR_W = 1e-5  # AdamW on w (paper, linear decay)
PAPER_LR_ALPHA = 0.1  # AdamW on α (constant in the official code)
PAPER_LR_PHASE2 = 5e-5  # fixed-mask fine-tuning
NOISE_EPS = 1e-6  # u is clamped to [eps, 1 − eps] so that log u and log(1 − u) stay finite
CONTAINER = "diff_pruning"  # attribute under which a module holds its phase-1 tensors


# -- the Hard-Concrete distribution (Louizos et al. 2018, temperature 1) ---------------------------------
def logistic_noise(u: torch.Tensor) -> torch.Tensor:
    """log u − log(1 − u) from uniforms u ~ U(0, 1) (in place), u clamped to [eps, 1 − eps] first."""
    return u.clamp_(NOISE_EPS, 1 - NOISE_EPS).logit_()  # (logit_(eps) does the same, ~10x slower in torch 2.13)


def hard_concrete(log_alpha: torch.Tensor, noise: torch.Tensor | None, left: float, right: float) -> torch.Tensor:
    """z = min(1, max(0, s(r − l) + l)) with s = σ(log u − log(1 − u) + α); noise=None gives the
    deterministic evaluation mask s = σ(α)."""
    s = torch.sigmoid(log_alpha if noise is None else log_alpha + noise)
    return nn.functional.hardtanh(s * (right - left) + left, 0.0, 1.0)  # min(1, max(0, ·)), one-pass backward


def log_ratio(left: float, right: float) -> float:
    """c = log(−l/r): P(z ≠ 0) = σ(α − c)."""
    return math.log(-left / right)


def prob_nonzero(log_alpha: torch.Tensor, left: float, right: float) -> torch.Tensor:
    c = log_ratio(left, right)
    return torch.sigmoid(log_alpha - c if c else log_alpha)  # c = 0 for the symmetric default


def prob_zero(log_alpha: torch.Tensor, left: float, right: float) -> torch.Tensor:
    return torch.sigmoid(log_ratio(left, right) - log_alpha)


def prob_one(log_alpha: torch.Tensor, left: float, right: float) -> torch.Tensor:
    return torch.sigmoid(log_alpha - math.log((1 - left) / (right - 1)))


def expected_l0(log_alpha: torch.Tensor, left: float, right: float) -> torch.Tensor:
    """E[‖z‖₀] = Σᵢ σ(αᵢ − c): the paper's penalty term, differentiable in α."""
    return prob_nonzero(log_alpha, left, right).sum()


def structured_expected_l0(
    log_alpha: torch.Tensor, group_log_alpha: torch.Tensor, group_size: int | None, left: float, right: float
) -> torch.Tensor:
    """The structured penalty Σ_g Σ_{i∈g} σ(αᵢ − c)·σ(α_g − c); groups are the whole tensor
    (group_size None) or consecutive chunks of group_size entries of the flattened tensor."""
    p = prob_nonzero(log_alpha, left, right).reshape(-1)
    if group_size is None:
        per_group = p.sum().reshape(1)
    else:
        per_group = nn.functional.pad(p, (0, (-len(p)) % group_size)).view(-1, group_size).sum(1)
    return (per_group * prob_nonzero(group_log_alpha, left, right)).sum()


def num_groups(numel: int, group_size: int | None) -> int:
    return 1 if group_size is None else math.ceil(numel / group_size)


# -- configuration -------------------------------------------------------------------------------------
@dataclass
class DiffPruningConfig(DeltaConfig):
    """Diff Pruning. Targets every parameter kind by default, as the paper (the new classifier head
    belongs in modules_to_save, where it gets a dense, unpenalised diff).

    density / count: phase-2 budget, the k largest |δ| (count overrides density); per_tensor keeps
        round(density·n) in each tensor instead of one global budget.
    l0_penalty: λ of λ·E[‖δ‖₀] (paper 1.25e-7; the sum over entries, not a mean).
    alpha_init: initial logit α (paper 5: P(z ≠ 0) ≈ 0.993).
    left, right: the stretch interval (l, r) of the Hard-Concrete, l < 0 < 1 < r (paper −1.5, 1.5).
    eval_mask: "deterministic" (clamp(σ(α)(r−l)+l, 0, 1)) or "sampled" (one mask drawn with eval_seed).
    structured: add a group logit α_g per group; δᵢ = zᵢ·z_g·wᵢ. group_size: None = one group per
        tensor (the paper's choice), else consecutive chunks of that many entries.
    init_from: phase-2 values start from "delta" (z⊙w, see the module docs) or "w" (official code).
    seed: the noise stream of phase 1.
    """

    method = "diff-pruning"
    parameter_kinds: tuple[str, ...] = PARAMETER_KINDS
    density: float = 0.005
    count: int | None = None
    per_tensor: bool = False
    l0_penalty: float = 1.25e-7
    alpha_init: float = 5.0
    left: float = -1.5
    right: float = 1.5
    eval_mask: str = "deterministic"
    eval_seed: int = 0
    structured: bool = False
    group_size: int | None = None
    init_from: str = "delta"
    seed: int = 0

    def __post_init__(self):
        super().__post_init__()
        if not self.left < 0:
            raise ValueError(
                f"left (l) must be < 0, got {self.left}: the stretch (l, r) must reach below 0 (paper: -1.5)"
            )
        if not self.right > 1:
            raise ValueError(
                f"right (r) must be > 1, got {self.right}: the stretch (l, r) must reach above 1 (paper: 1.5)"
            )
        check_density(self.density)
        if self.count is not None and (type(self.count) is not int or self.count < 1):
            raise ValueError(f"count must be a positive number of entries, got {self.count!r}")
        if self.count is not None and self.per_tensor:
            raise ValueError("count is one global budget; use density with per_tensor=True for a per-tensor budget")
        if not self.l0_penalty >= 0:
            raise ValueError(f"l0_penalty (λ) must be >= 0, got {self.l0_penalty}; the paper uses 1.25e-7")
        if self.eval_mask not in ("deterministic", "sampled"):
            raise ValueError(f"eval_mask must be 'deterministic' or 'sampled', got {self.eval_mask!r}")
        if self.init_from not in ("delta", "w"):
            raise ValueError(f"init_from must be 'delta' (z*w) or 'w', got {self.init_from!r}")
        if self.group_size is not None:
            if not self.structured:
                raise ValueError("group_size applies to the structured variant; set structured=True as well")
            if not self.group_size >= 1:
                raise ValueError(f"group_size must be >= 1, got {self.group_size}")

    def select(self, tensors):
        raise ValueError(
            "Diff Pruning learns its positions: call diff_pruning.start(model, config), train phase 1, "
            "then diff_pruning.project(model); sparsedelta.prepare cannot choose them up front"
        )


# -- phase-1 tensors of one targeted parameter ---------------------------------------------------------
CHUNK = 1 << 20  # entries per slice of the mask computation: its temporaries stay small (4 MiB each)
GROUPS = -1  # noise block of the group logits


class DiffVector(nn.Module):
    """w, α (and the group logits α_g) of one targeted tensor; δ = z ⊙ w (⊙ z_g).

    The noise comes in blocks of consecutive entries (an embedding row, else CHUNK entries), each
    drawn from its own generator keyed by (seed, tensor, step, block): any block's mask can be
    recomputed exactly, alone and in any order, so nothing is stored, and an embedding computes the
    mask of the rows its batch looks up only. The mask is computed slice by slice (≈ CHUNK entries)."""

    def __init__(self, weight: torch.Tensor, config: DiffPruningConfig, stream: int, row_blocks: bool = False):
        super().__init__()
        self.shape = tuple(weight.shape)
        self.numel = weight.numel()
        self.block = self.shape[-1] if row_blocks else CHUNK
        dtype = torch.promote_types(weight.dtype, torch.float32)
        kw = dict(dtype=dtype, device=weight.device)
        self.w = nn.Parameter(torch.zeros(self.shape, **kw))
        self.log_alpha = nn.Parameter(torch.full(self.shape, float(config.alpha_init), **kw))
        groups = num_groups(self.numel, config.group_size)
        self.group_log_alpha = (
            nn.Parameter(torch.full((groups,), float(config.alpha_init), **kw)) if config.structured else None
        )
        # optimizer steps seen so far (-1: none sampled yet); keys the noise, saved with state_dict for resuming
        self.register_buffer("noise_step", torch.tensor(-1, dtype=torch.long))
        self.left, self.right, self.group_size = config.left, config.right, config.group_size
        self.seed, self.eval_seed, self.stream = config.seed, config.eval_seed, stream
        self.eval_sampled = config.eval_mask == "sampled"
        self.pinned = False
        self._seen_versions = None
        self._kept = {}  # (step, slice start) -> noise drawn by a training forward, taken by its backward

    def leaves(self) -> list[torch.Tensor]:
        return [p for p in (self.w, self.log_alpha, self.group_log_alpha) if p is not None]

    def advance(self) -> int:
        """The noise step for a sampled forward: a new one after an optimizer changed w or α."""
        versions = tuple(p._version for p in self.leaves())
        if versions != self._seen_versions and not self.pinned:
            with torch.no_grad():
                self.noise_step.add_(1)
            self._seen_versions = versions
        return int(self.noise_step)

    def noise(self, step: int | None, blocks, size: int) -> torch.Tensor | None:
        """Logistic noise of the given blocks, concatenated (`size` entries in all; block GROUPS is
        the group logits'). Step None is the evaluation mask: no noise, or the one sampled mask."""
        if step is None and not self.eval_sampled:
            return None
        key = (self.eval_seed, self.stream, -1) if step is None else (self.seed, self.stream, step)
        gen = torch.Generator(device=self.w.device)
        u = torch.empty(size, dtype=self.w.dtype, device=self.w.device)
        start = 0
        for block in blocks:
            n = size - start if block == GROUPS else min(self.block, self.numel - block * self.block)
            u[start : start + n].uniform_(generator=gen.manual_seed(_mix(*key, block)))
            start += n
        return logistic_noise(u)

    def group_mask(self, step: int | None, group_log_alpha: torch.Tensor | None) -> torch.Tensor | None:
        if group_log_alpha is None:
            return None
        noise = self.noise(step, [GROUPS], len(group_log_alpha))
        return hard_concrete(group_log_alpha, noise, self.left, self.right)

    def entry_mask(self, noise, log_alpha, group_z, flat_index) -> torch.Tensor:
        """z (⊙ z_g) of whole noise blocks, from their noise, their entries' α (flat) and the whole
        group mask; flat_index() gives those entries' flat positions (only needed for chunked groups)."""
        z = hard_concrete(log_alpha, noise, self.left, self.right)
        if group_z is not None:
            z = z * (group_z.reshape(()) if self.group_size is None else group_z[flat_index() // self.group_size])
        return z

    def slices(self):
        """(start, stop, blocks) covering the flat tensor in block-aligned slices of about CHUNK entries."""
        per = max(1, CHUNK // self.block)
        for first in range(0, math.ceil(self.numel / self.block), per):
            start, stop = first * self.block, min((first + per) * self.block, self.numel)
            yield start, stop, range(first, math.ceil(stop / self.block))

    def slice_mask(self, step, start, stop, blocks, log_alpha, group_z, keep: bool = False) -> torch.Tensor:
        """z of the slice [start, stop). keep: a training forward keeps the noise for its backward."""
        noise = self._kept.get((step, start)) if keep else self._kept.pop((step, start), None)
        if noise is None:
            noise = self.noise(step, blocks, stop - start)
            if keep and noise is not None:
                if self._kept and next(iter(self._kept))[0] != step:
                    self._kept.clear()  # a forward without backward: drop the old step's noise
                self._kept[(step, start)] = noise
        index = lambda: torch.arange(start, stop, device=log_alpha.device)  # noqa: E731
        return self.entry_mask(noise, log_alpha, group_z, index)

    def row_mask(self, step, rows: torch.Tensor, log_alpha_rows: torch.Tensor, group_z) -> torch.Tensor:
        """z of whole rows (row blocks only), shaped like log_alpha_rows (len(rows), row length)."""
        width = self.block
        index = lambda: (rows[:, None] * width + torch.arange(width, device=rows.device)).reshape(-1)  # noqa: E731
        noise = self.noise(step, rows.tolist(), log_alpha_rows.numel())
        return self.entry_mask(noise, log_alpha_rows.reshape(-1), group_z, index).view(-1, width)

    def merged(self, weight: torch.Tensor | None, step: int | None, leaves=None, keep: bool = False) -> torch.Tensor:
        """θ + z ⊙ w (or δ = z ⊙ w alone for weight None), without autograd: one new tensor.
        keep: keep the noise for the backward of this step (see slice_mask)."""
        w, log_alpha, *group = leaves or self.leaves()
        with torch.no_grad():
            group_z = self.group_mask(step, group[0] if group else None)
            w, log_alpha = w.reshape(-1), log_alpha.reshape(-1)
            out = torch.empty(self.shape, dtype=w.dtype if weight is None else weight.dtype, device=w.device)
            flat_out, base = out.view(-1), None if weight is None else weight.reshape(-1)
            for a, b, blocks in self.slices():
                z = self.slice_mask(step, a, b, blocks, log_alpha[a:b], group_z, keep)
                if base is None:
                    torch.mul(z, w[a:b], out=flat_out[a:b])
                else:
                    _add_delta(base[a:b], z * w[a:b], flat_out[a:b])
        return out

    def merged_rows(self, weight: torch.Tensor, step: int | None, rows: torch.Tensor, leaves) -> torch.Tensor:
        """(θ + z ⊙ w)[rows], without autograd."""
        w, log_alpha, *group = leaves
        with torch.no_grad():
            z = self.row_mask(step, rows, log_alpha[rows], self.group_mask(step, group[0] if group else None))
            out = torch.empty((len(rows), self.block), dtype=weight.dtype, device=weight.device)
            _add_delta(weight[rows], z * w[rows], out)
        return out

    def delta(self, step: int | None = None) -> torch.Tensor:
        """δ = z ⊙ w at noise step `step` (None: the evaluation mask), without autograd."""
        return self.merged(None, step)

    def backward(self, step, leaves, needs, grad: torch.Tensor, weight: torch.Tensor | None = None):
        """Gradients of (w, α[, α_g]) from ∂L/∂(θ + δ), slice by slice, by autograd on the recomputed
        mask; also returns θ + δ when `weight` is given (the linear path needs it for ∂L/∂x)."""
        w, log_alpha, *group = leaves
        flat_grad = grad.reshape(-1)
        grads = [None] * len(leaves)
        merged = None if weight is None else torch.empty(self.shape, dtype=weight.dtype, device=weight.device)
        base = None if weight is None else weight.reshape(-1)
        wanted = [i for i, n in enumerate(needs) if n]
        with torch.enable_grad():
            group_in = group[0].detach().requires_grad_(needs[2]) if group else None
            group_z = self.group_mask(step, group_in)
            for a, b, blocks in self.slices():
                w_in = w.reshape(-1)[a:b].detach().requires_grad_(needs[0])
                alpha_in = log_alpha.reshape(-1)[a:b].detach().requires_grad_(needs[1])
                delta = self.slice_mask(step, a, b, blocks, alpha_in, group_z) * w_in
                if merged is not None:
                    _add_delta(base[a:b], delta.detach(), merged.view(-1)[a:b])
                if not wanted:
                    continue
                inputs = [(w_in, alpha_in, group_in)[i] for i in wanted]
                retain = group_z is not None and group_z.requires_grad and b < self.numel  # α_g's graph is shared
                got = torch.autograd.grad(delta, inputs, flat_grad[a:b].to(delta.dtype), retain_graph=retain)
                for i, g in zip(wanted, got):
                    if i == 2:  # group logits: a sum over slices
                        grads[2] = g if grads[2] is None else grads[2].add_(g)
                    elif a == 0 and b == self.numel:
                        grads[i] = g.view(self.shape)
                    else:
                        if grads[i] is None:
                            grads[i] = torch.empty(self.shape, dtype=g.dtype, device=g.device)
                        grads[i].view(-1)[a:b] = g
        return grads, merged

    def backward_rows(self, step, rows: torch.Tensor, leaves, needs, row_grads: torch.Tensor):
        """Gradients of (w, α[, α_g]) when only `rows` of θ + δ were used, with ∂L/∂(θ + δ)[rows]:
        autograd on those rows' mask; every other row's gradient is exactly 0."""
        w, log_alpha, *group = leaves
        wanted = [i for i, n in enumerate(needs) if n]
        if not wanted:
            return [None] * len(leaves)
        with torch.enable_grad():
            w_in = w[rows].detach().requires_grad_(needs[0])
            alpha_in = log_alpha[rows].detach().requires_grad_(needs[1])
            group_in = group[0].detach().requires_grad_(needs[2]) if group else None
            delta = self.row_mask(step, rows, alpha_in, self.group_mask(step, group_in)) * w_in
        got = torch.autograd.grad(delta, [(w_in, alpha_in, group_in)[i] for i in wanted], row_grads.to(delta.dtype))
        grads = [None] * len(leaves)
        for i, g in zip(wanted, got):
            grads[i] = g if i == 2 else torch.zeros_like(leaves[i]).index_copy_(0, rows, g)
        return grads

    def penalty_term(self) -> torch.Tensor:
        if self.group_log_alpha is None:
            return expected_l0(self.log_alpha, self.left, self.right)
        return structured_expected_l0(self.log_alpha, self.group_log_alpha, self.group_size, self.left, self.right)

    def extra_repr(self) -> str:
        groups = "" if self.group_log_alpha is None else f", groups={len(self.group_log_alpha)}"
        return f"shape={self.shape}{groups}"


def _add_delta(base: torch.Tensor, delta: torch.Tensor, out: torch.Tensor) -> None:
    """out = θ + δ, added in δ's precision and rounded to θ's dtype (as the core merges a delta)."""
    if base.dtype == delta.dtype:
        torch.add(base, delta, out=out)
    else:
        out.copy_(base.to(delta.dtype) + delta)


def _mix(*key: int) -> int:
    """A 63-bit generator seed from a tuple of small integers (stable across runs and processes)."""
    h = 1469598103934665603
    for k in key:
        h = ((h ^ (k & 0xFFFFFFFFFFFFFFFF)) * 1099511628211) & 0xFFFFFFFFFFFFFFFF
    return h >> 1


# -- gradient paths: θ + δ per layer, recomputed in backward --------------------------------------------
class DiffWeight(Function):
    """Any parameter: returns θ + δ (a temporary); backward gives ∂L/∂w, ∂L/∂α through δ."""

    @staticmethod
    def forward(ctx, weight, diff, step, keep, *leaves):
        ctx.diff, ctx.step = diff, step
        ctx.save_for_backward(*leaves)
        return diff.merged(weight, step, leaves, keep)

    @staticmethod
    def backward(ctx, grad):
        needs = ctx.needs_input_grad[4:]
        grads, _ = ctx.diff.backward(ctx.step, ctx.saved_tensors, needs, grad)
        return None, None, None, None, *grads


class DiffLinear(Function):
    """y = x (θ + δ)ᵀ + b (nn.Linear) or x (θ + δ) + b (transformers' Conv1D, transposed=True).
    Only x is kept for backward; θ + δ is recomputed there instead of held across the step."""

    @staticmethod
    def forward(ctx, x, weight, bias, diff, step, keep, transposed, *leaves):
        ctx.diff, ctx.step, ctx.transposed = diff, step, transposed
        ctx.bias_dtype = bias.dtype if bias is not None else None
        ctx.save_for_backward(x, weight, *leaves)
        merged = diff.merged(weight, step, leaves, keep)
        return linear(x, merged if transposed else merged.t(), bias)

    @staticmethod
    def backward(ctx, grad_out):
        x, weight, *leaves = ctx.saved_tensors
        needs = ctx.needs_input_grad[7:]
        g = grad_out.reshape(-1, grad_out.shape[-1])
        x2 = x.reshape(-1, x.shape[-1]).to(g.dtype)
        dense = x2.t().matmul(g) if ctx.transposed else g.t().matmul(x2)  # ∂L/∂(θ + δ), this layer only
        leaf_grads, merged = ctx.diff.backward(ctx.step, leaves, needs, dense, weight)
        del dense
        grad_x = grad_bias = None
        if ctx.needs_input_grad[0]:
            w = merged if ctx.transposed else merged.t()  # (in, out)
            grad_x = grad_out.matmul(w.to(g.dtype).t()).to(x.dtype)
        if ctx.bias_dtype is not None and ctx.needs_input_grad[2]:
            grad_bias = g.sum(0).to(ctx.bias_dtype)
        return grad_x, None, grad_bias, None, None, None, None, *leaf_grads


class DiffEmbedding(Function):
    """nn.Embedding lookup of θ + δ that computes the mask of the looked-up rows only."""

    @staticmethod
    def forward(ctx, ids, weight, padding_idx, diff, step, *leaves):
        rows, inverse = torch.unique(ids, return_inverse=True)
        ctx.diff, ctx.step, ctx.padding_idx = diff, step, padding_idx
        ctx.save_for_backward(rows, inverse, *leaves)
        return nn.functional.embedding(inverse, diff.merged_rows(weight, step, rows, leaves))

    @staticmethod
    def backward(ctx, grad_out):
        rows, inverse, *leaves = ctx.saved_tensors
        width = grad_out.shape[-1]
        row_grads = grad_out.new_zeros(len(rows), width).index_add_(0, inverse.reshape(-1), grad_out.reshape(-1, width))
        if ctx.padding_idx is not None:  # as F.embedding: the padding row gets no gradient
            row_grads[rows == ctx.padding_idx] = 0
        grads = ctx.diff.backward_rows(ctx.step, rows, leaves, ctx.needs_input_grad[5:], row_grads)
        return None, None, None, None, None, *grads


def _embedding_ok(module: nn.Module) -> bool:
    """Plain lookups take the row path; max_norm (renormalises θ in place), scale_grad_by_freq and
    sparse gradients take the generic one."""
    return (
        type(module) is nn.Embedding and module.max_norm is None and not module.scale_grad_by_freq and not module.sparse
    )


def _linear_kind(module: nn.Module) -> bool | None:
    """Fast path for the weight of a plain linear layer: transposed flag, or None for no fast path."""
    kind = type(module)
    if kind is nn.Linear:
        return False
    if kind.__name__ == "Conv1D" and kind.__module__.startswith("transformers"):
        return True
    return None


def _phase_one_forward(self: nn.Module, *args, **kwargs):
    sampled = self.training
    keep = sampled and torch.is_grad_enabled()  # this forward's noise is kept for its backward
    own = self._diffprune_own_forward
    transposed = _linear_kind(self) if own else None
    embedding = own and _embedding_ok(self)
    swapped, fast = [], None
    try:
        for pname, diff in self._diffprune_bindings:
            step = diff.advance() if sampled else None
            if pname == "weight" and (transposed is not None or embedding):
                fast = (diff, step)
                continue
            original = self._parameters[pname]
            self._parameters[pname] = DiffWeight.apply(original, diff, step, keep, *diff.leaves())
            swapped.append((pname, original))
        if fast is None:
            return self._diffprune_inner_forward(*args, **kwargs)
        diff, step = fast
        x = args[0] if args else kwargs["input"]
        if embedding:
            return DiffEmbedding.apply(x, self.weight, self.padding_idx, diff, step, *diff.leaves())
        return DiffLinear.apply(x, self.weight, self.bias, diff, step, keep, transposed, *diff.leaves())
    finally:
        for pname, original in swapped:
            self._parameters[pname] = original


def _wrap(module: nn.Module) -> None:
    if "_diffprune_bindings" in module.__dict__:
        return
    module._diffprune_own_forward = "forward" not in module.__dict__
    module._diffprune_inner_forward = module.forward
    module._diffprune_bindings = []
    module.forward = types.MethodType(_phase_one_forward, module)


def _unwrap(module: nn.Module) -> None:
    if "_diffprune_bindings" not in module.__dict__:
        return
    if module._diffprune_own_forward:
        del module.forward
    else:
        module.forward = module._diffprune_inner_forward
    for attr in ("_diffprune_own_forward", "_diffprune_inner_forward", "_diffprune_bindings"):
        delattr(module, attr)
    if CONTAINER in module._modules:
        del module._modules[CONTAINER]


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
        raise ValueError(
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
        raise ValueError("Diff Pruning phase 1 is already running on this model; project() or discard() it first")
    core = getattr(model, "_sparsedelta", None)
    if core is not None and core.active is not None and core.merged:
        raise ValueError(
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
            _wrap(module)
            module._diffprune_bindings.append((owned_name, diff))
        diffs[path], owners[path] = diff, target.owners
    head, originals = {}, {}
    for module_name in saved_modules:
        module = model.get_submodule(module_name)
        for pname, param in list(module.named_parameters(recurse=False)):
            path = f"{module_name}.{pname}"
            originals[path] = param
            head[path] = module._parameters[pname] = nn.Parameter(param.detach().clone())
    model._diff_pruning = PhaseOne(config, diffs, owners, head, originals)
    return model


def param_groups(
    model: nn.Module, lr_w: float = PAPER_LR_W, lr_alpha: float = PAPER_LR_ALPHA, lr_head: float | None = None
) -> list[dict]:
    """Optimizer groups for phase 1: w, the logits α (and α_g), the dense head (lr_head, default lr_w).
    No weight decay anywhere, as in the paper; every group has a "name"."""
    state = phase_one(model)
    groups = [
        {"name": "w", "params": [d.w for d in state.diffs.values()], "lr": lr_w, "weight_decay": 0.0},
        {
            "name": "alpha",
            "params": [p for d in state.diffs.values() for p in d.leaves()[1:]],
            "lr": lr_alpha,
            "weight_decay": 0.0,
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
            raise ValueError("count is one global budget; use density with per_tensor=True")
        if not 1 <= count <= total:
            raise ValueError(f"count must lie in [1, {total:,}] (the targeted entries), got {count}")
        return smallest_k(scores, count)
    check_density(density)
    if per_tensor:
        return {n: smallest_k({n: s}, budget(s.numel(), density))[n] for n, s in scores.items()}
    return smallest_k(scores, budget(total, density))


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
        raise ValueError(
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
            _unwrap(module)
    for path, original in state.head_originals.items():
        module_name, _, pname = path.rpartition(".")
        model.get_submodule(module_name)._parameters[pname] = original
    del model._diff_pruning
    return model
