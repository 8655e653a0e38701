"""The Hard-Concrete distribution (Louizos et al. 2018) at temperature 1, as Diff Pruning uses it.

u ~ U(0, 1); s = σ(log u − log(1 − u) + α); s̄ = s(r − l) + l; z = min(1, max(0, s̄)). Its closed forms
give the expected-L0 penalty: P(z ≠ 0) = σ(α − log(−l/r)).
"""

from __future__ import annotations

import math

import torch
from torch import nn

NOISE_EPS = 1e-6  # u is clamped to [eps, 1 − eps] so that log u and log(1 − u) stay finite


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

