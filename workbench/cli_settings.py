"""`--set FIELD=VALUE` options: parsed against a config dataclass's fields and their types."""

from __future__ import annotations

import dataclasses
import typing
from typing import Any

from workbench.errors import WorkbenchError


def parse_settings(cls: type, settings: list[str] | None, *, flag: str = "--set") -> dict[str, Any]:
    """`{field: value}` from `FIELD=VALUE` strings; unknown fields and bad values are refused."""
    from workbench.cli_attack import _parse_value

    if not dataclasses.is_dataclass(cls):
        raise WorkbenchError(f"{cls.__name__} is not a config dataclass")
    try:
        hints: dict[str, Any] = typing.get_type_hints(cls)
    except Exception:
        hints = {f.name: f.type for f in dataclasses.fields(cls)}
    names = [f.name for f in dataclasses.fields(cls)]
    values: dict[str, Any] = {}
    for item in settings or []:
        key, sep, raw = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep:
            raise WorkbenchError(f"{flag} {item!r}: expected FIELD=VALUE")
        if key not in names:
            raise WorkbenchError(f"{flag} {key}: {cls.__name__} has no field {key!r}; fields: {', '.join(names)}")
        values[key] = _parse_value(raw, hints.get(key, str), key)
    return values
