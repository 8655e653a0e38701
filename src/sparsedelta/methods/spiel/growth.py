"""SpIEL's drop and grow for one tensor: the candidate positions scored by accumulated gradients, the
entries that moved least dropped, the best candidates grown, and the optimizer's moments of the
changed entries reset.

Memory. No dense gradient of the model is kept: while a window is open, each targeted layer's backward
computes its own dense weight gradient (as the non-sampled fast path does anyway), shows it to the
layer's `CandidateScores` and frees it. The window's first backward (its first micro-batch under
gradient accumulation) picks the C largest |gradient| positions outside the delta (C = candidates_per_slot × the entries to replace, the official
`candidates_per_replacement_slot`); every step of the window adds the gradient at those C positions
and at the delta's own k entries, so that an entry about to be dropped competes with the candidates
(as in the official code, where a dropped entry can be grown back in place). Kept per tensor for the
window: C + k positions (int64) and three float32 sums (this step, all steps, squares), 20 bytes
each: 40·k bytes at a later re-selection (C = 5 · 0.2k = k) and 120·k bytes at the first one
(first_rate 1: C = 5k, capped at the free positions). Transient: the layer's dense gradient and its
|·| for the top-C on the first step, one layer at a time. Later steps of the window need the
gradient at the C + k positions only: a linear layer whose sampled product pays at that count (CPU,
C + k ≤ 10% of the layer) takes the sampled product there instead of the dense one
(`sampled_pattern`, core/ops.py), so only the window's first step costs a dense product. The official code (`gradient_accumulation_
hook`) takes its candidates among all positions, active ones included, C = k per module; at density
1% and above the active entries then fill much of the candidate list (in a 16×32 test layer at 10%
density no entry moved after the first re-selection), so ours are drawn from the free positions.

Under several processes (torchrun) the first step's dense gradient and each step's sums are averaged
across processes (all-reduce), so every process picks the same candidates and the same growth.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from ...core.delta import SparseDelta, csr_of


def _world() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _averaged(t: torch.Tensor) -> torch.Tensor:
    """The mean of `t` over the processes (a no-op in one process); every process must call it."""
    world = _world()
    if world == 1:
        return t
    t = t.float().clone()
    dist.all_reduce(t)  # SUM: gloo has no AVG
    return t / world


class CandidateScores:
    """A SparseDelta's gradient observer during one accumulation window (see the module's doc)."""

    def __init__(self, count: int, delta: SparseDelta):
        self.count = count  # C, the candidates to keep besides the delta's entries
        self._delta = delta  # its entries at the first gradient seen (they do not move in a window)
        self.positions: torch.Tensor | None = None  # C candidates and the delta's entries, sorted; set at the first gradient
        self._pattern = None  # (crow, col) of `positions` and the entries' places among them, once asked for
        self.this_step: torch.Tensor | None = None
        self.total: torch.Tensor | None = None
        self.squares: torch.Tensor | None = None
        self.steps = 0

    def __call__(self, dense_grad: torch.Tensor) -> None:
        flat = dense_grad.reshape(-1)
        if self.positions is None:
            flat = _averaged(flat)
            delta = self._delta
            scores = flat.abs().float()
            scores[delta.indices] = -1  # below every |gradient|: never a candidate
            scores[delta.frozen_indices] = -1
            count = min(self.count, flat.numel() - delta.num_entries)
            candidates = torch.topk(scores, count, sorted=False).indices
            # sorted: the order of equal scores never depends on topk's, and the positions make a CSR pattern
            self.positions = torch.sort(torch.cat([candidates, delta.indices])).values
            self.this_step = torch.zeros(len(self.positions), dtype=torch.float32, device=flat.device)
            self.total, self.squares = torch.zeros_like(self.this_step), torch.zeros_like(self.this_step)
        self.add(flat[self.positions])

    def add(self, grad_at_positions: torch.Tensor) -> None:
        """This backward's gradient at `positions` (from the dense gradient, or the sampled product)."""
        self.this_step += grad_at_positions.float()  # micro-batches of one step add up to its gradient

    def sampled_pattern(self):
        """`positions` as a CSR pattern (crow, col) of a 2-D weight, for the sampled product; None
        before the first gradient chose them, or for another shape."""
        delta = self._delta
        if self.positions is None or len(delta.shape) != 2:
            return None
        if self._pattern is None:
            self._pattern = csr_of(self.positions, delta.shape)
        return self._pattern

    @property
    def entry_slots(self) -> torch.Tensor:
        """The places of the delta's entries in `positions` (both sorted)."""
        return torch.searchsorted(self.positions, self._delta.indices)

    def begin_step(self) -> None:
        """A step starts: what a step skipped by fp16's loss scaler left is dropped."""
        if self.this_step is not None:
            self.this_step.zero_()

    def end_step(self, loss_scale: float = 1.0) -> None:
        """A step was taken: its gradient at the candidates, divided by the loss scale its backward
        carried (fp16), joins the sums."""
        if self.positions is None:
            return
        step = _averaged(self.this_step) / loss_scale
        self.total += step
        self.squares += step * step
        self.this_step.zero_()
        self.steps += 1

    def state(self) -> dict:
        # copies: the sums keep growing in place after a checkpoint is taken
        tensors = {k: None if v is None else v.clone() for k, v in (("positions", self.positions),
                   ("this_step", self.this_step), ("total", self.total), ("squares", self.squares))}  # fmt: skip
        return {"count": self.count, "steps": self.steps, **tensors}

    @classmethod
    def from_state(cls, state: dict, delta: SparseDelta) -> CandidateScores:
        scores = cls(state["count"], delta)
        scores.steps = state["steps"]
        for key in ("positions", "this_step", "total", "squares"):
            value = state[key]
            setattr(scores, key, None if value is None else value.clone())
        return scores


def drop_and_grow(
    delta: SparseDelta, scores: CandidateScores, n: int, optimizer=None, grown_state: str = "seeded"
) -> int:
    """Replace up to `n` of the delta's trainable entries: drop those with the smallest |value| and grow
    the positions with the largest |summed gradient| among the candidates and the dropped entries. A
    dropped entry that is among the best stays as it is (the official code's rule). The count k is
    unchanged; fewer than n are replaced when fewer candidates qualify. Returns the number replaced."""
    k = len(delta.indices)
    n = min(n, k)
    if n == 0 or scores.positions is None or scores.steps == 0:
        return 0
    values = delta.values.detach()
    dropped = torch.topk(values.abs(), n, largest=False, sorted=True).indices  # smallest |δ| first
    kept = torch.ones(k, dtype=torch.bool, device=values.device)
    kept[dropped] = False
    valid = ~torch.isin(scores.positions, delta.indices[kept])
    if len(delta.frozen_indices):
        valid &= ~torch.isin(scores.positions, delta.frozen_indices)
    candidates, total, squares = scores.positions[valid], scores.total[valid], scores.squares[valid]
    best = torch.topk(total.abs(), min(n, len(candidates)), largest=True, sorted=True).indices
    incoming = candidates[best]
    leaving = delta.indices[dropped]
    dropped = dropped[~torch.isin(leaving, incoming)]  # dropped and regrown: unchanged
    new = ~torch.isin(incoming, leaving)
    incoming, best = incoming[new], best[new]
    dropped = dropped[: len(incoming)]  # the smallest |δ| leave when fewer candidates qualify
    if not len(incoming):
        return 0
    mean = total[best] / scores.steps
    mean_square = squares[best] / scores.steps
    if optimizer is not None:
        _reset_moments(optimizer, delta.values, dropped, mean, mean_square, grown_state)
    order = delta.replace_entries(dropped, incoming)
    if optimizer is not None:
        _permute_state(optimizer, delta.values, order, k)
    return len(incoming)


def _inner(optimizer):
    return getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer wraps torch's


def _reset_moments(optimizer, param, slots, mean, mean_square, how: str) -> None:
    """Adam's moments at the grown entries' slots: zero, or (how="seeded") the window's mean gradient
    and mean squared gradient, pre-multiplied by Adam's bias correction at the current step so that
    the next update sees m̂ = mean and v̂ = mean square (the official code does the same with an age
    per entry; torch's AdamW has one step count per tensor)."""
    optimizer = _inner(optimizer)
    state = optimizer.state.get(param)
    if not state:
        return
    group = next(g for g in optimizer.param_groups if any(p is param for p in g["params"]))
    beta1, beta2 = group.get("betas", (0.9, 0.999))
    step = float(state["step"]) if "step" in state else 0.0
    seeded = {"exp_avg": mean * (1 - beta1**step), "exp_avg_sq": mean_square * (1 - beta2**step),
              "max_exp_avg_sq": mean_square * (1 - beta2**step)}  # fmt: skip
    for key, value in state.items():
        if torch.is_tensor(value) and value.dim() == 1 and len(value) == len(param):
            if how == "seeded" and key in seeded:
                value[slots] = seeded[key].to(value.dtype)
            else:
                value[slots] = 0


def _permute_state(optimizer, param, order, k: int) -> None:
    state = _inner(optimizer).state.get(param)
    for value in (state or {}).values():
        if torch.is_tensor(value) and value.dim() == 1 and len(value) == k:
            value.copy_(value[order])
