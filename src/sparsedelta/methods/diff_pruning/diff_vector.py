"""Phase-1 tensors of one targeted parameter: w, α (and the group logits), the mask computed slice by
slice from noise that is regenerated, never stored."""

from __future__ import annotations

import math

import torch
from torch import nn

from ...seeds import mix
from .config import DiffPruningConfig
from .hard_concrete import expected_l0, hard_concrete, logistic_noise, num_groups, structured_expected_l0

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
            u[start : start + n].uniform_(generator=gen.manual_seed(mix(*key, block)))
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

