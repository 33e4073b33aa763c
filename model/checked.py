"""One check for every config dataclass: the range metadata declared on its fields.

A config field declares its range next to itself:

    k: int = field(default=8, metadata={"ge": 1})
    dtype: str = field(default="float32", metadata={"choices": ("float32", "bfloat16")})

with the keys `ge`, `gt`, `le`, `lt` (bounds) and `choices` (allowed values); a field whose
value is None (an optional field left unset) passes. Each config's __post_init__ calls
`check_fields(self)` first and then checks only what metadata cannot say (rules across fields),
so a config built in code and one loaded from YAML (jobs/config/loader.py builds every section
through its constructor) are checked by the same code. Type conversion is the loader's job:
this module checks values, not types.

The error's message starts with the field name, `k: expected a value >= 1, got 0`, which the
loader reports at that key with its file:line (or --set).
"""

from __future__ import annotations

import dataclasses
import operator
from typing import Any, Callable

from model.errors import M3Error

__all__ = ["FieldError", "RULES", "check_fields"]

# metadata key -> (test, how the error names the bound)
RULES: dict[str, tuple[Callable[[Any, Any], bool], str]] = {
    "ge": (operator.ge, ">="),
    "gt": (operator.gt, ">"),
    "le": (operator.le, "<="),
    "lt": (operator.lt, "<"),
}


class FieldError(M3Error, ValueError):
    """A config field outside its declared range; `field` names it."""

    def __init__(self, field: str, expected: str, got: object):
        super().__init__(f"{field}: expected {expected}, got {got!r}")
        self.field, self.expected, self.got = field, expected, got


def check_fields(obj: Any, error: Callable[[str, str, object], Exception] = FieldError) -> None:
    """Check every field of dataclass instance `obj` against its metadata, in declaration order.

    Raises `error(field, expected, got)` (a FieldError unless the caller names its own error
    class of that signature) for the first field out of range.
    """
    for f in dataclasses.fields(obj):
        meta = f.metadata
        value = getattr(obj, f.name)
        if value is None or not meta:
            continue
        for key, (ok, sym) in RULES.items():
            if key not in meta:
                continue
            try:
                passed = ok(value, meta[key])
            except TypeError:  # not comparable (a string for a number): out of range too
                passed = False
            if not passed:
                raise error(f.name, f"a value {sym} {meta[key]}", value)
        if "choices" in meta and value not in meta["choices"]:
            raise error(f.name, "one of " + ", ".join(repr(c) for c in meta["choices"]), value)
