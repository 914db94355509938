"""Adversary generators: inputs designed from interpretations, plus baselines.

Generators register themselves in `adversaries.registry` (name -> class); importing this
package imports every generator module listed in `GENERATOR_MODULES`, so `adversaries.get("pgd")` works after `import adversaries`. None of
them imports `transformers` at import time (benchmarks import them beside torchvision).
"""

import importlib

from adversaries.registry import Adversary, available, get, register

GENERATOR_MODULES: tuple[str, ...] = (
    "adversaries.pgd",
    "adversaries.adversarial_patch",
    "adversaries.natural",
    "adversaries.feature_level",
    "adversaries.text_triggers",
    "adversaries.copy_paste",
    "adversaries.scene_search",
)

for _name in GENERATOR_MODULES:
    importlib.import_module(_name)

__all__ = ["Adversary", "GENERATOR_MODULES", "available", "get", "register"]
