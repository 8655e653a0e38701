"""Configuration shared by every method: which tensors get a delta, what else is trained.

A method is a subclass that adds its own fields and implements `select`, which turns the
targeted tensors into the positions to train (the split `torch.nn.utils.prune` uses:
one method = one small class with one job).
"""

from __future__ import annotations

import dataclasses
import math
import re
import reprlib
import types
import typing
from dataclasses import dataclass, field
from typing import ClassVar

import torch

from ..errors import UsageError
from .registry import Registry

PARAMETER_KINDS = ("weight", "bias", "embedding", "norm")
_CONFIG_TYPES: Registry[type[DeltaConfig]] = Registry("delta config method")


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
        if "method" in cls.__dict__:  # a shared base (e.g. one for budgets) names no method of its own
            _CONFIG_TYPES.add(cls.method, cls)

    def __post_init__(self):
        self.parameter_kinds = tuple(self.parameter_kinds)
        unknown = set(self.parameter_kinds) - set(PARAMETER_KINDS)
        if unknown:
            raise UsageError(f"unknown parameter kinds {sorted(unknown)}; choose from {list(PARAMETER_KINDS)}")
        for option in ("target_modules", "exclude_modules"):
            pattern = getattr(self, option)
            if isinstance(pattern, str):
                try:
                    re.compile(pattern)
                except re.error as e:
                    raise UsageError(f"{option} {pattern!r} is not a valid regular expression: {e}") from e

    def select(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Return flat positions to train for each targeted tensor (name -> int64 positions)."""
        raise NotImplementedError(f"{type(self).__name__} does not choose positions; pass them to add_delta")

    def to_dict(self) -> dict:
        return {"method": self.method, **dataclasses.asdict(self)}

    @staticmethod
    def from_dict(data: dict) -> DeltaConfig:
        """The config `to_dict` wrote (e.g. read from a delta file). Unknown keys are ignored; a known
        field of the wrong type raises TypeError naming it, an unknown method ValueError."""
        if not isinstance(data, dict):
            raise TypeError(f"a delta config is a JSON object, got {type(data).__name__}")
        data = dict(data)
        method = data.pop("method", "custom")
        if not isinstance(method, str) or method not in _CONFIG_TYPES:
            raise UsageError(f"unknown method {method!r} in delta config; known: {sorted(_CONFIG_TYPES.names())}")
        cls = _CONFIG_TYPES[method]
        try:
            hints = typing.get_type_hints(cls)
        except Exception:  # noqa: BLE001 - a method's annotations that do not resolve: its own checks apply
            hints = {}
        kwargs = {}
        for f in dataclasses.fields(cls):
            if f.init and f.name in data:
                if f.name in hints and not _conforms(data[f.name], hints[f.name]):
                    raise TypeError(
                        f"config field {f.name} of method {method!r} is {reprlib.repr(data[f.name])}, "
                        f"not {_describe(hints[f.name])}"
                    )
                kwargs[f.name] = data[f.name]
        return cls(**kwargs)


_CONFIG_TYPES.add("custom", DeltaConfig)


def _conforms(value, hint) -> bool:
    """Whether a JSON value fits a field's annotation (None, bool, int, float, str, lists, tuples, unions)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_conforms(value, a) for a in args)
    if origin in (list, tuple):  # JSON has no tuples: a list stands for either
        item = args[0] if args else typing.Any
        return isinstance(value, (list, tuple)) and all(_conforms(v, item) for v in value)
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:  # within int64: positions, counts and seeds all go to torch
        return isinstance(value, int) and not isinstance(value, bool) and -(2**63) <= value < 2**63
    if hint is float:
        if isinstance(value, int) and not isinstance(value, bool):
            return -(2**63) <= value < 2**63
        return isinstance(value, float) and math.isfinite(value)
    if hint is str:
        return isinstance(value, str)
    return True  # an annotation this check does not know: the class's own checks apply


def _describe(hint) -> str:
    return str(hint).replace("typing.", "").replace("NoneType", "None")


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
