"""Interpretability workbench: findings -> predictions -> actions -> measured verdicts.

This package is the core: it imports nothing from the methods (`editors`, `adversaries`),
the protocols, the case studies or the command line above it. Its public API is re-exported
here lazily, so `import workbench` stays cheap and the command line starts fast:

    import workbench as wb
    h = wb.load("zoo:factgpt")
    trace = wb.causal_trace(h, "The capital of {} is", "Vel Oran")
    rw = wb.Rewrite(prompt="The capital of {} is", subject="Vel Oran", target_new="Quenn")
    scores = wb.evaluate_rewrites(h, [rw])             # CounterFact ES / PS / NS / S / GE
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
    "causal_trace": "workbench.tracing",
    "CausalTrace": "workbench.tracing",
    "attribute_neurons": "workbench.knowledge_neurons",
    "select_units": "workbench.unit_selection",
    "Rewrite": "workbench.requests",
    "evaluate_rewrites": "workbench.counterfact",
    "aggregate_cases": "workbench.counterfact",
    "bootstrap_intervals": "workbench.counterfact",
    "FactWorld": "workbench.worlds.factworld",
    "ShapesWorld": "workbench.worlds.shapesworld",
    "CaseStudy": "workbench.casestudy",
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
