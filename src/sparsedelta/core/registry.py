"""A table of named classes with one duplicate rule, shared by the method configs (core/config.py)
and the method runners (methods/registry.py): a name, once taken, is never silently replaced."""

from __future__ import annotations

from typing import Generic, TypeVar

from ..errors import UsageError

T = TypeVar("T")


class Registry(Generic[T]):
    def __init__(self, kind: str):
        self.kind, self._table = kind, {}

    def add(self, name: str, value: T) -> T:
        """Register `value` under `name`; registering the same object again is a no-op."""
        taken = self._table.get(name)
        if taken is not None and taken is not value:
            raise UsageError(
                f"a {self.kind} named {name!r} is registered already ({taken.__qualname__}); "
                f"give {value.__qualname__} a name of its own"
            )
        self._table[name] = value
        return value

    def remove(self, name: str) -> None:
        self._table.pop(name, None)

    def __contains__(self, name: object) -> bool:
        return name in self._table

    def __getitem__(self, name: str) -> T:
        return self._table[name]

    def names(self) -> list[str]:
        return list(self._table)
