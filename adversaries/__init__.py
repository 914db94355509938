"""Adversary generators: inputs designed from interpretations, plus baselines.

    from adversaries import CopyPaste, PGD
    examples = PGD(eps=8 / 255).generate(handle, (images, labels), target="star")

Importing the package registers every generator in `adversaries.registry` (name -> class),
so the command line, the protocols and the case studies find a method by name in one table.
None of them imports `transformers` at import time (benchmarks import them beside
torchvision).
"""

from adversaries.adversarial_patch import AdversarialPatch
from adversaries.base import AdversarialExamples
from adversaries.copy_paste import CopyPaste, DesignConfig
from adversaries.feature_level import FeatureLevel
from adversaries.natural import SNAFUE, AdversarialFiltering
from adversaries.pgd import PGD
from adversaries.placement_sweep import SweepConfig
from adversaries.registry import Adversary, available, get, register
from adversaries.scene_search import SceneSearch
from adversaries.text_triggers import TextTrigger

__all__ = ["PGD", "SNAFUE", "AdversarialExamples", "AdversarialFiltering", "AdversarialPatch", "Adversary", "CopyPaste",
           "DesignConfig", "FeatureLevel", "SceneSearch", "SweepConfig", "TextTrigger", "available", "get", "register"]
