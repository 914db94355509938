"""Adversary generators: inputs designed from interpretations, plus baselines.

Generators register themselves in `adversaries.registry` (name -> class).
"""

from adversaries.registry import Adversary, available, get, register

__all__ = ["Adversary", "available", "get", "register"]
