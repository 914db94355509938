"""Interpretability workbench: findings -> predictions -> actions -> measured verdicts.

The public API is re-exported here lazily (so `import workbench` stays cheap and the CLI
starts fast): `workbench.load`, `capture`, `patch`, `edit`, `resolve_site`, `list_sites`,
`WeightDelta`, `collect_statistics`, `RunStore`, and the worlds.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS: dict[str, str] = {
    "load": "workbench.models",
    "wrap_hf_model": "workbench.models",
    "ModelHandle": "workbench.handle",
    "Architecture": "workbench.handle",
    "ImagePreprocess": "workbench.handle",
    "Site": "workbench.sites",
    "resolve_site": "workbench.sites",
    "list_sites": "workbench.sites",
    "capture": "workbench.hooks",
    "patch": "workbench.hooks",
    "edit": "workbench.hooks",
    "WeightDelta": "workbench.delta",
    "StreamingMoments": "workbench.statistics",
    "collect_statistics": "workbench.statistics",
    "RunStore": "workbench.results",
    "WorkbenchError": "workbench.errors",
    "resolve_device": "workbench.devices",
    "model_fingerprint": "workbench.fingerprint",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'workbench' has no attribute {name!r}")


def __dir__() -> list[str]:
    return __all__
