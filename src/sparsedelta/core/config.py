"""Configuration shared by every method: which tensors get a delta, what else is trained.

A method is a subclass that adds its own fields and implements `select`, which turns the
targeted tensors into the positions to train (the split `torch.nn.utils.prune` uses:
one method = one small class with one job).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import ClassVar

import torch

PARAMETER_KINDS = ("weight", "bias", "embedding", "norm")
_CONFIG_TYPES: dict[str, type[DeltaConfig]] = {}


@dataclass
class DeltaConfig:
    """Targeting, as in PEFT.

    target_modules: a list matches a module whose name equals an entry or ends with "." + entry;
        a string is a regular expression that must match the whole module name; None = every module.
    exclude_modules: same matching; these modules get no delta.
    parameter_kinds: which parameters of the targeted modules get a delta: "weight" (matrices and
        kernels), "bias", "embedding" (nn.Embedding tables), "norm" (any *Norm layer's parameters).
    modules_to_save: modules trained densely and saved in full (e.g. a new classifier head).
    """

    target_modules: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None
    parameter_kinds: tuple[str, ...] = ("weight",)
    modules_to_save: list[str] | None = None

    method: ClassVar[str] = "custom"

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        _CONFIG_TYPES[cls.method] = cls

    def __post_init__(self):
        self.parameter_kinds = tuple(self.parameter_kinds)
        unknown = set(self.parameter_kinds) - set(PARAMETER_KINDS)
        if unknown:
            raise ValueError(f"unknown parameter kinds {sorted(unknown)}; choose from {list(PARAMETER_KINDS)}")

    def select(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Return flat positions to train for each targeted tensor (name -> int64 positions)."""
        raise NotImplementedError(f"{type(self).__name__} does not choose positions; pass them to add_delta")

    def to_dict(self) -> dict:
        return {"method": self.method, **dataclasses.asdict(self)}

    @staticmethod
    def from_dict(data: dict) -> DeltaConfig:
        data = dict(data)
        method = data.pop("method", "custom")
        if method not in _CONFIG_TYPES:
            raise ValueError(f"unknown method {method!r} in delta config; known: {sorted(_CONFIG_TYPES)}")
        cls = _CONFIG_TYPES[method]
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


_CONFIG_TYPES["custom"] = DeltaConfig


@dataclass
class SelectionReport:
    """How many entries a selection rule picked."""

    rule: str
    selected: int
    eligible: int
    per_tensor: dict[str, int] = field(default_factory=dict)

    @property
    def density(self) -> float:
        return self.selected / max(self.eligible, 1)

    def __str__(self) -> str:
        return f"{self.rule}: selected {self.selected:,} of {self.eligible:,} targeted entries ({self.density:.3%})"
