"""One check for every config dataclass: its fields' types, their declared ranges, and the rules
across fields, each failing with a `FieldError` that names the field.

A config field declares its type by annotation and its range next to itself:

    k: int = field(default=8, metadata={"ge": 1})
    dtype: str = field(default="float32", metadata={"choices": ("float32", "bfloat16")})

with the keys `ge`, `gt`, `le`, `lt` (bounds) and `choices` (allowed values); a field whose
value is None (an optional field left unset) passes the range. Each config's __post_init__ calls
`check_fields(self)` first and then checks only what metadata cannot say (rules across fields),
raising `FieldError` itself (`require` is the one-line form). A config built in code and one
loaded from YAML (jobs/config/loader.py builds every section through its constructor and reads
`FieldError.field` to report the key with its file:line or --set) are checked by the same code
and fail with the same words.

The error's message starts with the field name, `k: expected a value >= 1, got 0`.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import numbers
import operator
import types
import typing
from typing import Any, Callable

from model.errors import M3Error

__all__ = ["FieldError", "FieldTypeError", "RULES", "check_fields", "require", "type_name"]

# metadata key -> (test, how the error names the bound)
RULES: dict[str, tuple[Callable[[Any, Any], bool], str]] = {
    "ge": (operator.ge, ">="),
    "gt": (operator.gt, ">"),
    "le": (operator.le, "<="),
    "lt": (operator.lt, "<"),
}

_UNSET = object()


class FieldError(M3Error, ValueError):
    """A config field's value is wrong. `field` names it: a field of the dataclass that raised,
    or a dotted path below it (`model.vocab_size` for a rule of the whole config), with an index
    for an element (`paths[1]`). `reason` is the message without the field."""

    def __init__(self, field: str, expected: str, got: object = _UNSET):
        self.field, self.expected, self.got = field, expected, got
        self.reason = expected if got is _UNSET else f"expected {expected}, got {got!r}"
        super().__init__(f"{field}: {self.reason}")

    def __reduce__(self):  # rebuilt from its parts, not its message: a Ray worker's error reaches the driver
        return type(self), (self.field, self.expected) if self.got is _UNSET else (self.field, self.expected, self.got)


class FieldTypeError(FieldError, TypeError):
    """A value of the wrong type; also a TypeError, for callers that catch that."""

    def __init__(self, field: str, expected: str, got: object):
        super().__init__(field, expected, got)
        self.reason = f"{self.reason} ({type(got).__name__})"
        self.args = (f"{field}: {self.reason}",)


def require(ok: bool, field: str, expected: str, got: object = _UNSET) -> None:
    """A rule across fields: FieldError(field, expected, got) unless ok."""
    if not ok:
        raise FieldError(field, expected, got)


def type_name(tp: Any) -> str:
    """How an error names type `tp`: "an integer", "a list of a string", "a number or null"."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(type_name(a) for a in typing.get_args(tp))
    if origin in (list, tuple):
        return f"a list of {type_name(typing.get_args(tp)[0])}"
    if origin is dict:
        k, v = typing.get_args(tp)
        return f"a mapping of {type_name(k)} to {type_name(v)}"
    if tp is type(None):
        return "null"
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    return {bool: "true/false", int: "an integer", float: "a number", str: "a string"}.get(tp, str(tp))


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    try:
        return typing.get_type_hints(cls)
    except (NameError, TypeError):  # a class whose annotations name what its module cannot see
        return {f.name: f.type for f in dataclasses.fields(cls) if not isinstance(f.type, str)}


def _typed(value: Any, tp: Any, name: str) -> Any:
    """`value` as type `tp` (an int for a float field becomes a float, a list for a tuple a
    tuple, as YAML and JSON write them), or FieldTypeError."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        for arm in typing.get_args(tp):
            try:
                return _typed(value, arm, name)
            except FieldTypeError:
                pass
    elif tp is type(None):
        if value is None:
            return None
    elif origin in (list, tuple):
        if isinstance(value, (list, tuple)):
            inner = typing.get_args(tp)[0]
            return tuple(_typed(v, inner, f"{name}[{i}]") for i, v in enumerate(value))
    elif origin is dict:
        if isinstance(value, dict):
            kt, vt = typing.get_args(tp)
            return {_typed(k, kt, name): _typed(v, vt, f"{name}[{k!r}]") for k, v in value.items()}
    elif tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:  # bool is an int subclass: `bands: true` is a mistake, not 1
        if isinstance(value, numbers.Integral) and not isinstance(value, bool):
            return int(value)
    elif tp is float:
        if isinstance(value, numbers.Real) and not isinstance(value, bool):
            if not math.isfinite(value):
                raise FieldError(name, "a finite number", value)
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    elif isinstance(tp, type):
        if isinstance(value, tp):
            return value
    else:  # an annotation this check does not know: not checked
        return value
    raise FieldTypeError(name, type_name(tp), value)


def check_fields(obj: Any) -> None:
    """Check every field of dataclass instance `obj`, in declaration order: its type (storing
    the value as the declared type), then its metadata. Raises FieldError for the first field
    that fails."""
    hints = _hints(type(obj))
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if f.name in hints:
            typed = _typed(value, hints[f.name], f.name)
            if typed is not value:
                object.__setattr__(obj, f.name, typed)
                value = typed
        meta = f.metadata
        if value is None or not meta:
            continue
        for key, (ok, sym) in RULES.items():
            if key not in meta:
                continue
            try:
                passed = ok(value, meta[key])
            except TypeError:  # not comparable: out of range too
                passed = False
            if not passed:
                raise FieldError(f.name, f"a value {sym} {meta[key]}", value)
        if "choices" in meta and value not in meta["choices"]:
            raise FieldError(f.name, "one of " + ", ".join(repr(c) for c in meta["choices"]), value)
