"""Case studies: each states a prediction, acts, and measures whether it held.

One module per study, each defining `Study`, a `workbench.casestudy.CaseStudy`. The
harness (prediction freezing and hashing, controls, seeds, bootstrap CIs, verdicts) lives
in `workbench.casestudy`; `workbench reproduce` runs them.

`PLANNED` lists the studies of issue 6 in order; a study whose module is not written yet
(its capability lands with another issue) is reported as such instead of silently missing.
Studies can also be named by number ("1") or as `package.module:Class` for a study
outside this package.
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import Any

from workbench.errors import WorkbenchError

PLANNED: tuple[tuple[int, str, str], ...] = (
    (1, "fact_localization", "Fact localization predicts editability (causal trace -> ROME layer)"),
    (2, "editor_comparison", "ROME vs MEMIT vs FT vs FT-L vs KN on the same rewrites"),
    (3, "mass_editing", "Mass editing: MEMIT at 10/100/1000 edits vs sequential ROME"),
    (4, "knowledge_neurons", "Knowledge neurons: suppress and amplify vs random neurons"),
    (5, "trojan_surgery", "Trojan surgery on ShapesNet: units by activation difference / dissection"),
    (6, "copy_paste", "Copy/paste adversaries from feature visualizations and exemplars"),
    (7, "trojan_rediscovery", "Trojan rediscovery benchmark (Casper et al. 2023 protocol)"),
    (8, "natural_adversaries", "Feature-level and natural adversaries: predicted vs measured fooling"),
    (9, "concept_erasure", "Concept erasure on MiniLM"),
    (10, "rule_rewrite", "Classifier rule rewrite of the spurious colour correlation"),
)
_BY_NUMBER = {str(num): name for num, name, _ in PLANNED}


def _module_name(name: str) -> str:
    return f"case_studies.{name}"


def available() -> list[str]:
    """Names of the planned studies whose module exists, in study order."""
    return [name for _, name, _ in PLANNED if importlib.util.find_spec(_module_name(name)) is not None]


def resolve(name: str) -> type:
    """The `Study` class for a name, a number, or `package.module:Class`."""
    if ":" in name:
        module, _, attr = name.partition(":")
        try:
            cls = getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError) as exc:
            raise WorkbenchError(f"cannot load study {name!r} ({exc}); give module:Class of a CaseStudy subclass") from None
        return cls
    key = _BY_NUMBER.get(name, name).replace("-", "_")
    planned = {n for _, n, _ in PLANNED}
    if key not in planned:
        valid = ", ".join(f"{num} {n}" for num, n, _ in PLANNED)
        raise WorkbenchError(f"unknown study {name!r}; studies: {valid} (or module:Class)")
    if key not in available():
        raise WorkbenchError(f"study {key!r} is planned but not written yet; available now: {', '.join(available())}")
    return importlib.import_module(_module_name(key)).Study


def make(name: str, **kwargs: Any) -> Any:
    return resolve(name)(**kwargs)
