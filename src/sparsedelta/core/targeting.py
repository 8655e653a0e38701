"""Which parameters of a model get a sparse delta, with PEFT's matching rules."""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass, field

from torch import nn

from ..errors import UsageError
from .config import DeltaConfig
from .quantized import is_quantized_param

CONTAINER = "sparse_delta"  # attribute under which a module holds its deltas


@dataclass
class Target:
    """One targeted tensor. A tied tensor (e.g. lm_head = token embeddings) is one target with
    several owners; its delta is trained, saved and merged once."""

    name: str  # the first parameter path under which the tensor appears
    param: nn.Parameter
    kind: str
    owners: list[tuple[nn.Module, str]] = field(default_factory=list)


def matches(name: str, patterns: list[str] | str | None) -> bool:
    if patterns is None:
        return False
    if isinstance(patterns, str):
        return re.fullmatch(patterns, name) is not None
    return any(name == p or name.endswith("." + p) for p in patterns)


def parameter_kind(module: nn.Module, param_name: str) -> str:
    if isinstance(module, nn.Embedding):
        return "embedding"
    if "norm" in type(module).__name__.lower():
        return "norm"
    return "bias" if param_name.endswith("bias") else "weight"


def check_patterns_match(patterns, names: list[str], option: str) -> None:
    if patterns is None:
        return
    if isinstance(patterns, str):
        if not any(re.fullmatch(patterns, n) for n in names):
            near = difflib.get_close_matches(patterns, names, n=5, cutoff=0.3)
            raise UsageError(f"{option} regex {patterns!r} matches no module. Similar module names: {near}")
        return
    suffixes = sorted({n.split(".")[-1] for n in names if n} | set(names))
    for p in patterns:
        if not any(n == p or n.endswith("." + p) for n in names):
            near = difflib.get_close_matches(p, suffixes, n=5, cutoff=0.5)
            raise UsageError(
                f"{option} entry {p!r} matches no module of the model. "
                f"Did you mean one of {near}? Use an exact module name or its last part(s)."
            )


def find_targets(model: nn.Module, config: DeltaConfig) -> tuple[dict[str, Target], list[str]]:
    """Return (targets by parameter path, names of the modules to save densely)."""
    modules = [(n, m) for n, m in model.named_modules() if CONTAINER not in n.split(".")]
    module_names = [n for n, _ in modules]
    for option in ("target_modules", "exclude_modules", "modules_to_save"):
        check_patterns_match(getattr(config, option), module_names, option)

    saved = [n for n in module_names if n and matches(n, config.modules_to_save)]
    inside_saved = lambda n: any(n == s or n.startswith(s + ".") for s in saved)  # noqa: E731

    owners: dict[int, list[tuple[str, nn.Module, str]]] = {}
    params: dict[int, nn.Parameter] = {}
    for module_name, module in modules:
        for pname, param in module.named_parameters(recurse=False):
            owners.setdefault(id(param), []).append((module_name, module, pname))
            params[id(param)] = param

    def eligible(module_name: str, module: nn.Module, pname: str) -> bool:
        return (
            (config.target_modules is None or matches(module_name, config.target_modules))
            and not matches(module_name, config.exclude_modules)
            and parameter_kind(module, pname) in config.parameter_kinds
        )

    targets: dict[str, Target] = {}
    for key, owned_by in owners.items():
        param = params[key]
        floating = param.is_floating_point() or is_quantized_param(param)  # a quantized weight: its dequantized θ
        if not floating or any(inside_saved(m) for m, _, _ in owned_by):
            continue
        hits = [o for o in owned_by if eligible(*o)]
        if not hits or any(matches(m, config.exclude_modules) for m, _, _ in owned_by):
            continue
        first_name, first_module, first_pname = owned_by[0]
        path = f"{first_name}.{first_pname}" if first_name else first_pname
        kind = parameter_kind(hits[0][1], hits[0][2])
        targets[path] = Target(path, param, kind, [(m, p) for _, m, p in owned_by])
    if not targets:
        raise UsageError(
            f"no parameter matched the targets {config.target_modules!r} with the parameter kinds "
            f"{list(config.parameter_kinds)}; check both (--target-modules, --parameter-kinds; in Python "
            "target_modules=, parameter_kinds=), e.g. add 'embedding' or 'norm'"
        )
    return targets, saved
