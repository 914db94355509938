"""The adversary table and the protocol every generator follows."""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

from workbench.registry import Registry


@runtime_checkable
class Adversary(Protocol):
    """A generator: a frozen config whose `generate` returns AdversarialExamples
    (originals, adversarial inputs, perturbation or patch, loss trace, success per item)."""

    def generate(self, handle: Any, inputs: Any, target: Any) -> Any: ...


ADVERSARIES: Registry[type] = Registry("adversary")
register = ADVERSARIES.register
available = ADVERSARIES.available
get = ADVERSARIES.get
