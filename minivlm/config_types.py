"""Config values by their field's type: command-line strings parsed, JSON values checked.

A dataclass field's annotation (``int``, ``float``, ``bool``, ``str``, ``X | None``,
``tuple[float, float]``, ``tuple[str, ...]``, ``dict[str, float]``) says what a JSON value may
be. :func:`check_value` returns the value in the field's type, or raises
:class:`ConfigError` naming the dotted field, the expected type and what came.
JSON has no tuples (lists are accepted) and writes whole floats as integers (an ``int`` is
accepted for a ``float``); nothing else is converted: a string is never parsed as a number.
"""

from __future__ import annotations

import json
import types
import typing
from typing import Any


class ConfigError(ValueError):
    """An invalid configuration value or combination; the message names the field (re-exported by
    :mod:`minivlm.config`, which is where callers import it from)."""


#: JSON value types each scalar annotation accepts (an integer is a whole float in JSON).
_SCALARS: dict[Any, tuple[type, ...]] = {bool: (bool,), int: (int,), float: (int, float), str: (str,)}


def type_name(annotation: Any) -> str:
    """``int``, ``float or None``, ``tuple of 2 float``, ... as an error message says it."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(type_name(a) for a in args).replace("NoneType", "None")
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            return f"list of {type_name(args[0])}"
        return f"list of {len(args)} " + (type_name(args[0]) if len(set(args)) == 1 else f"({', '.join(map(type_name, args))})")
    if origin is dict:
        return f"object of {type_name(args[1])}" if args else "object"
    if origin is list:
        return f"list of {type_name(args[0])}" if args else "list"
    return getattr(annotation, "__name__", str(annotation))


def check_value(value: Any, annotation: Any, name: str) -> Any:
    """``value`` as the annotated type; ``ConfigError`` naming ``name`` when it is not one."""

    def fail() -> ConfigError:
        shown = repr(value) if len(repr(value)) <= 60 else repr(value)[:57] + "..."
        return ConfigError(f"{name}: expected {type_name(annotation)}, got {shown} ({type(value).__name__})")

    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if annotation is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for arg in (a for a in args if a is not type(None)):
            try:
                return check_value(value, arg, name)
            except ConfigError:
                continue
        raise fail()
    if annotation in _SCALARS:
        # bool is an int in Python, but `"n_layers": true` is not a layer count.
        if not isinstance(value, _SCALARS[annotation]) or (isinstance(value, bool) and annotation is not bool):
            raise fail()
        return float(value) if annotation is float else value
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise fail()
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(check_value(v, args[0], f"{name}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            raise fail()
        return tuple(check_value(v, a, f"{name}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if origin is list:
        if not isinstance(value, list):
            raise fail()
        return [check_value(v, args[0], f"{name}[{i}]") for i, v in enumerate(value)] if args else list(value)
    if origin is dict:
        if not isinstance(value, dict):
            raise fail()
        if not args:
            return dict(value)
        return {check_value(k, args[0], f"{name} key"): check_value(v, args[1], f"{name}.{k}") for k, v in value.items()}
    return value  # an annotation this checker does not know: left to validate()


def parse_value(raw: str, t: Any, name: str) -> Any:
    """Parse a command-line string (``decoder.n_layers=8``) into the field's annotated type."""
    args = typing.get_args(t)
    if typing.get_origin(t) in (typing.Union, types.UnionType):
        if raw.lower() in ("none", "null"):
            if type(None) in args:
                return None
        inner = [a for a in args if a is not type(None)]
        return parse_value(raw, inner[0], name)
    if t is bool:
        if raw.lower() in ("1", "true", "yes", "on"):
            return True
        if raw.lower() in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"{name}: expected true/false, got {raw!r}")
    if t in (int, float):
        try:
            return t(raw)
        except ValueError:
            raise ConfigError(f"{name}: expected {t.__name__}, got {raw!r}") from None
    if t is str:
        return raw
    if typing.get_origin(t) in (tuple, list, dict):
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            raise ConfigError(f"{name}: expected JSON for a {typing.get_origin(t).__name__}, got {raw!r}") from None
        return check_value(value, t, name)
    raise ConfigError(f"{name}: cannot parse a value of type {t}")
