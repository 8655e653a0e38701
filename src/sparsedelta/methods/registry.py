"""The methods a run can use, by name. Each method registers itself in its own module:

    register_method(SaRARunner)          # name, config class and summary come from the runner class

and everything that lists methods (the command line's choices and help, the runner lookup, the
tests) reads this table, so adding a method is one new module imported by `methods/__init__.py`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..core.registry import Registry
from ..errors import UsageError

if TYPE_CHECKING:
    from .base import MethodRunner, MethodSettings

_RUNNERS: Registry[type[MethodRunner]] = Registry("method")


def register_method(runner: type[MethodRunner]) -> type[MethodRunner]:
    """Add a runner class under its `name` (usable as a class decorator)."""
    if not runner.name:
        raise UsageError(f"{runner.__name__} has no name")
    return _RUNNERS.add(runner.name, runner)


def method_names() -> list[str]:
    return _RUNNERS.names()


def runner_class(name: str) -> type[MethodRunner]:
    if name not in _RUNNERS:
        raise UsageError(f"unknown method {name!r}; choose one of: {', '.join(_RUNNERS.names())}")
    return _RUNNERS[name]


def make_runner(settings: MethodSettings) -> MethodRunner:
    """The runner of `settings.method`, with its settings checked (before any model is loaded)."""
    return runner_class(settings.method)(settings)
