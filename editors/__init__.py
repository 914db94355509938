"""Weight-edit methods: each turns a finding into a `WeightDelta`.

Editors register themselves in `editors.registry` so the CLI and case studies find a
method by name in one table.
"""

from editors.registry import Editor, available, get, register

__all__ = ["Editor", "available", "get", "register"]
