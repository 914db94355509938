"""User-facing errors.

Every mistake a user can make (bad spec, unknown site, corrupt file) raises a subclass of
`WorkbenchError`; the CLI turns it into a one-line message and exit code 2 instead of a
traceback from deep inside torch.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any


class WorkbenchError(ValueError):
    """A problem with the user's input: says what was wrong and what would be right."""


class UnknownModelError(WorkbenchError):
    """A model spec that names no zoo model, local folder or reachable hub model."""


class UnknownSiteError(WorkbenchError):
    """A site name that does not resolve; the message lists valid names."""


class CorruptFileError(WorkbenchError):
    """A cache, checkpoint or delta file that fails its checksum or cannot be parsed."""


class UnsafeFileError(WorkbenchError):
    """A file that would need unpickling (we never unpickle untrusted data)."""


class FingerprintMismatchError(WorkbenchError):
    """A WeightDelta applied to a model other than the one it was fitted on."""


class LockHeldError(WorkbenchError):
    """A lock another live process holds; `holder` is what that process wrote into the lock file."""

    def __init__(self, message: str, *, path: str, holder: dict[str, object]) -> None:
        super().__init__(message)
        self.path = path
        self.holder = holder


def check_finite(name: str, value: Any) -> None:
    """Refuse a float (or each float of a tuple/list) that is NaN or infinite, naming the setting."""
    values = value if isinstance(value, (tuple, list)) else (value,)
    for v in values:
        if isinstance(v, float) and not math.isfinite(v):
            raise WorkbenchError(f"{name}={value!r}: expected a finite number (not NaN or infinity)")


def require_finite(config: Any) -> None:
    """Refuse a config dataclass any of whose float settings is NaN or infinite (it would fit a NaN delta)."""
    for f in dataclasses.fields(config):
        check_finite(f"{type(config).__name__} {f.name}", getattr(config, f.name))
