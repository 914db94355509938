"""The editor table and the protocol every editor follows."""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

from workbench.registry import Registry


@runtime_checkable
class Editor(Protocol):
    """A weight-edit method: a frozen config whose `fit` returns a WeightDelta.

    Fitting must leave the model bit-for-bit unchanged; the caller applies the delta
    (`with delta.applied(model): ...`).
    """

    def fit(self, handle: Any, request: Any) -> Any: ...


EDITORS: Registry[type] = Registry("editor")
register = EDITORS.register
available = EDITORS.available
get = EDITORS.get
