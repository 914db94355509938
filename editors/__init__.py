"""Weight-edit methods: each turns a finding into a `WeightDelta`.

Importing the package registers every editor in `editors.registry` (name -> class), so
the CLI and case studies find a method by name in one table.
"""

from editors import (  # noqa: F401  (registration)
    concept_erasure,
    finetune,
    knowledge_neuron_edit,
    memit,
    rome,
    rule_rewrite,
    steering,
    unit_ablation,
)
from editors.registry import Editor, available, get, register

__all__ = ["Editor", "available", "get", "register"]
