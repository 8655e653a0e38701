"""Diff Pruning's configuration: targeting, the projection budget and the Hard-Concrete settings."""

from __future__ import annotations

from dataclasses import dataclass

from ...core.config import PARAMETER_KINDS, DeltaConfig
from ...core.selection import check_density


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

