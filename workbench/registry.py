"""A name -> class table, so the CLI and case studies look methods up in one place."""

from __future__ import annotations

from collections.abc import Callable
from typing import Generic, TypeVar

from workbench.errors import WorkbenchError

T = TypeVar("T", bound=type)


class Registry(Generic[T]):
    """Named classes of one kind (editors, adversaries); unknown names list the valid ones."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._table: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        """Class decorator recording the class under `name` (unique)."""

        def wrap(cls: T) -> T:
            if name in self._table and self._table[name] is not cls:
                raise ValueError(f"{self.kind} {name!r} registered twice")
            self._table[name] = cls
            return cls

        return wrap

    def available(self) -> list[str]:
        return sorted(self._table)

    def get(self, name: str) -> T:
        if name not in self._table:
            valid = ", ".join(self.available()) or "(none registered yet)"
            raise WorkbenchError(f"unknown {self.kind} {name!r}; available: {valid}")
        return self._table[name]
