"""The embedded defaults (model and data shipped as PyPI packages), located without importing them:
their own __init__ files pull in heavy dependencies we do not need."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from ..errors import UsageError


def package_dir(module: str, pip_name: str, needed_for: str, instead: str) -> Path:
    """The folder of installed package `module`, or a UsageError naming the install command."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise UsageError(
            f"{needed_for} needs the package {pip_name}; install it with `pip install --no-deps {pip_name}` or {instead}"
        )
    return Path(spec.submodule_search_locations[0])
