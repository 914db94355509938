"""`--set FIELD=VALUE` options: parsed against a config dataclass's fields and their types."""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from typing import Any

from workbench.errors import WorkbenchError


def parse_settings(cls: type, settings: list[str] | None, *, flag: str = "--set") -> dict[str, Any]:
    """`{field: value}` from `FIELD=VALUE` strings; unknown fields and bad values are refused.

    A field that is itself a config dataclass (a group) is set field by field with dotted
    names, `GROUP.FIELD=VALUE` (any depth); its value is then the group's default with those
    fields replaced.
    """
    if not dataclasses.is_dataclass(cls):
        raise WorkbenchError(f"{cls.__name__} is not a config dataclass")
    names = setting_names(cls)
    pairs: list[tuple[str, str]] = []
    for item in settings or []:
        key, sep, raw = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep:
            raise WorkbenchError(f"{flag} {item!r}: expected FIELD=VALUE")
        if key not in names:
            if any(n.startswith(key + ".") for n in names):
                raise WorkbenchError(f"{flag} {key}: {key!r} is a group of fields; set them one by one as "
                                     f"{key}.FIELD=VALUE; fields: {', '.join(names)}")
            nested = [n for n in names if n.endswith("." + key)]
            hint = f" (did you mean {' or '.join(nested)}?)" if nested else ""
            raise WorkbenchError(f"{flag} {key}: {cls.__name__} has no field {key!r}{hint}; fields: {', '.join(names)}")
        pairs.append((key, raw))
    return _values(cls, pairs, prefix="", flag=flag)


def setting_names(cls: type) -> list[str]:
    """Every name `parse_settings` accepts for `cls`: its fields, with GROUP.FIELD for each field of a group."""
    out: list[str] = []
    for f in dataclasses.fields(cls):
        group = _group_type(cls, f)
        out += [f"{f.name}.{name}" for name in setting_names(group)] if group is not None else [f.name]
    return out


def _hints(cls: type) -> dict[str, Any]:
    try:
        return typing.get_type_hints(cls)
    except Exception:
        return {f.name: f.type for f in dataclasses.fields(cls)}


def _default(f: dataclasses.Field[Any]) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None


def _group_type(cls: type, f: dataclasses.Field[Any]) -> type | None:
    """The config dataclass a field holds (by its type, or by its default), or None for a plain field."""
    hint = _hints(cls).get(f.name)
    if isinstance(hint, type) and dataclasses.is_dataclass(hint):
        return hint
    default = _default(f)
    if dataclasses.is_dataclass(default) and not isinstance(default, type):
        return type(default)
    return None


def _values(cls: type, pairs: list[tuple[str, str]], *, prefix: str, flag: str) -> dict[str, Any]:
    hints = _hints(cls)
    values: dict[str, Any] = {}
    groups: dict[str, list[tuple[str, str]]] = {}
    for key, raw in pairs:
        head, dot, rest = key.partition(".")
        if dot:
            groups.setdefault(head, []).append((rest, raw))
        else:
            values[key] = parse_value(raw, hints.get(key, str), prefix + key)
    for head, items in groups.items():
        f = next(f for f in dataclasses.fields(cls) if f.name == head)
        group = _group_type(cls, f)
        assert group is not None
        changes = _values(group, items, prefix=f"{prefix}{head}.", flag=flag)
        base = _default(f)
        try:
            values[head] = dataclasses.replace(base, **changes) if base is not None else group(**changes)
        except TypeError as exc:
            raise WorkbenchError(f"{flag} {prefix}{head}: cannot build {group.__name__} ({exc})") from None
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
