"""`--set FIELD=VALUE` options: parsed against a config dataclass's fields and their types."""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from typing import Any

from workbench.errors import WorkbenchError


def parse_settings(cls: type, settings: list[str] | None, *, flag: str = "--set") -> dict[str, Any]:
    """`{field: value}` from `FIELD=VALUE` strings; unknown fields and bad values are refused."""
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
        values[key] = parse_value(raw, hints.get(key, str), key)
    return values


def parse_value(raw: str, annotation: Any, name: str) -> Any:
    """`raw` as a value of type `annotation` (unions, literals, tuples, bool, int, float with a/b, str)."""
    text = raw.strip()
    if isinstance(annotation, str):  # an unresolved postponed annotation: take the text as is
        annotation = str
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        if text.lower() == "none" and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return parse_value(text, a, name)
            except WorkbenchError as exc:
                errors.append(str(exc))
        raise WorkbenchError(f"--set {name}={raw}: " + "; ".join(errors))
    if origin is typing.Literal:
        if text not in [str(a) for a in args]:
            raise WorkbenchError(f"--set {name}={raw}: expected one of {', '.join(str(a) for a in args)}")
        return text
    if origin is tuple:
        parts = [p for p in text.split(",") if p.strip()] if text else []
        inner = args[0] if args else str
        return tuple(parse_value(p, inner, name) for p in parts)
    if annotation is bool:
        if text.lower() in ("1", "true", "yes", "on"):
            return True
        if text.lower() in ("0", "false", "no", "off"):
            return False
        raise WorkbenchError(f"--set {name}={raw}: expected true or false")
    if annotation in (int, float):
        try:
            if annotation is int:
                return int(text)
            if "/" in text:
                num, den = text.split("/", 1)
                value = float(num) / float(den)
            else:
                value = float(text)
        except (ValueError, ZeroDivisionError):
            raise WorkbenchError(f"--set {name}={raw}: expected a {annotation.__name__} (a number, or a/b with b != 0)") from None
        if not math.isfinite(value):
            raise WorkbenchError(f"--set {name}={raw}: expected a finite number")
        return value
    return text


def build_config(cls: type, settings: list[str] | None) -> Any:
    """The generator's config from `--set FIELD=VALUE` strings, with the field types' parsing."""
    return cls(**parse_settings(cls, settings))
