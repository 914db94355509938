"""Case studies: each states a prediction, acts, and measures whether it held.

One module per study, each defining `Study`, a `workbench.casestudy.CaseStudy`. The
harness (prediction freezing and hashing, controls, seeds, bootstrap CIs, verdicts) lives
in `workbench.casestudy`; `workbench reproduce` runs them.

`STUDIES` lists the studies in order. A study can be named by number ("1"), by name, or
as `package.module:Class` for a study outside this package.
"""

from __future__ import annotations

import importlib
from typing import Any

from workbench.casestudy import CaseStudy
from workbench.errors import WorkbenchError

STUDIES: tuple[tuple[int, str, str], ...] = (
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
_BY_NUMBER = {str(num): name for num, name, _ in STUDIES}


def available() -> list[str]:
    """The studies' names, in study order."""
    return [name for _, name, _ in STUDIES]


def resolve(name: str) -> type:
    """The `Study` class for a name, a number, or `package.module:Class`."""
    if ":" in name:
        module, _, attr = name.partition(":")
        try:
            cls = getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError, ValueError) as exc:
            raise WorkbenchError(f"cannot load study {name!r} ({exc}); give module:Class of a CaseStudy subclass") from None
        if not (isinstance(cls, type) and issubclass(cls, CaseStudy)):
            raise WorkbenchError(f"study {name!r} is a {type(cls).__name__}, not a CaseStudy class; give module:Class "
                                 "of a workbench.casestudy.CaseStudy subclass")
        return cls
    key = _BY_NUMBER.get(name, name).replace("-", "_")
    if key not in available():
        valid = ", ".join(f"{num} {n}" for num, n, _ in STUDIES)
        raise WorkbenchError(f"unknown study {name!r}; studies: {valid} (or module:Class)")
    return importlib.import_module(f"case_studies.{key}").Study


def make(name: str, **kwargs: Any) -> Any:
    return resolve(name)(**kwargs)
