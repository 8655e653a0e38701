"""Diff Pruning's configuration: targeting, the projection budget and the Hard-Concrete settings."""

from __future__ import annotations

from dataclasses import dataclass, field

from ...core.config import PARAMETER_KINDS, DeltaConfig
from ...core.selection import check_density
from ...errors import UsageError


@dataclass
class DiffPruningConfig(DeltaConfig):
    """Diff Pruning. Targets every parameter kind by default, as the paper (the new classifier head
    belongs in modules_to_save, where it gets a dense, unpenalised diff)."""

    method = "diff-pruning"
    parameter_kinds: tuple[str, ...] = PARAMETER_KINDS
    density: float = field(default=0.005, metadata={"help": "phase-2 budget: the k largest |δ| as a fraction (paper 0.5%)"})  # fmt: skip
    count: int | None = field(default=None, metadata={"help": "instead, exactly this many entries (overrides density)"})  # fmt: skip
    per_tensor: bool = field(default=False, metadata={"help": "keep round(density·n) in each tensor, not one global budget"})  # fmt: skip
    l0_penalty: float = field(default=1.25e-7, metadata={"help": "λ of λ·E[‖δ‖₀], a sum over entries (paper 1.25e-7)"})  # fmt: skip
    alpha_init: float = field(default=5.0, metadata={"help": "initial mask logit α (paper 5: P(z ≠ 0) ≈ 0.993)"})
    left: float = field(default=-1.5, metadata={"help": "l of the Hard-Concrete stretch (l, r), l < 0 (paper -1.5)"})
    right: float = field(default=1.5, metadata={"help": "r of the stretch, r > 1 (paper 1.5)"})
    eval_mask: str = field(default="deterministic", metadata={
        "help": "'deterministic': clamp(σ(α)(r−l)+l, 0, 1); 'sampled': one mask drawn with eval_seed (paper)"})  # fmt: skip
    eval_seed: int = field(default=0, metadata={"help": "seed of the sampled evaluation mask"})
    structured: bool = field(default=False, metadata={"help": "add a group logit α_g per group: δᵢ = zᵢ·z_g·wᵢ"})
    group_size: int | None = field(default=None, metadata={
        "help": "structured groups: None = one per tensor (paper), else chunks of this many entries"})  # fmt: skip
    init_from: str = field(default="delta", metadata={
        "help": "phase-2 values start from 'delta' (z⊙w, what phase 1 applied) or 'w' (official code)"})  # fmt: skip
    seed: int = field(default=0, metadata={"help": "seed of phase 1's noise stream"})

    def __post_init__(self):
        super().__post_init__()
        if not self.left < 0:
            raise UsageError(
                f"left (l) must be < 0, got {self.left}: the stretch (l, r) must reach below 0 (paper: -1.5)"
            )
        if not self.right > 1:
            raise UsageError(
                f"right (r) must be > 1, got {self.right}: the stretch (l, r) must reach above 1 (paper: 1.5)"
            )
        check_density(self.density)
        if self.count is not None and (type(self.count) is not int or self.count < 1):
            raise UsageError(f"count must be a positive number of entries, got {self.count!r}")
        if self.count is not None and self.per_tensor:
            raise UsageError("count is one global budget; use density with per_tensor=True for a per-tensor budget")
        if not self.l0_penalty >= 0:
            raise UsageError(f"l0_penalty (λ) must be >= 0, got {self.l0_penalty}; the paper uses 1.25e-7")
        if self.eval_mask not in ("deterministic", "sampled"):
            raise UsageError(f"eval_mask must be 'deterministic' or 'sampled', got {self.eval_mask!r}")
        if self.init_from not in ("delta", "w"):
            raise UsageError(f"init_from must be 'delta' (z*w) or 'w', got {self.init_from!r}")
        if self.group_size is not None:
            if not self.structured:
                raise UsageError("group_size applies to the structured variant; set structured=True as well")
            if not self.group_size >= 1:
                raise UsageError(f"group_size must be >= 1, got {self.group_size}")

    def select(self, tensors):
        raise UsageError(
            "Diff Pruning learns its positions: call diff_pruning.start(model, config), train phase 1, "
            "then diff_pruning.project(model); sparsedelta.prepare cannot choose them up front"
        )

