"""Load YAML into typed, frozen dataclasses, failing early with errors a person can act on.

Every error names the dotted key, where it came from (file:line, or the --set override) and
what was expected; a misspelled key gets the nearest valid name suggested. Nothing here knows
the pipeline's schema: `jobs.config` declares it, this module enforces it.

This module converts types; values are checked by the dataclass itself, so a config built in
code gets the same checks: range metadata on the fields (`ge`, `gt`, `le`, `lt`, `choices`,
enforced by `model.checked.check_fields`) and cross-field rules, both in __post_init__, whose
ValueError is reported at the field it names.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from model.errors import M3Error


class ConfigError(M3Error, ValueError):
    """A config problem, phrased for the person who wrote the file."""


class _Lined(dict):
    """A YAML mapping that remembers the line of each key."""

    lines: dict[str, int]


class _LineLoader(yaml.SafeLoader):
    pass


def _construct_lined(loader: _LineLoader, node: yaml.MappingNode) -> _Lined:
    mapping = _Lined(loader.construct_mapping(node, deep=True))
    mapping.lines = {k.value: k.start_mark.line + 1 for k, _ in node.value}
    return mapping


_LineLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_lined)


def read_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.load(path.read_text(encoding="utf-8"), Loader=_LineLoader)
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if data is None:
        return _Lined()
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections, got {type(data).__name__}")
    return data


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply `dotted.key=value` overrides (values parsed as YAML) onto the raw mapping."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected dotted.key=value")
        key, raw = item.split("=", 1)
        parts = key.strip().split(".")
        if not all(parts):
            raise ConfigError(f"--set {item!r}: empty key segment in {key!r}")
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError as e:
            raise ConfigError(f"--set {key}: value {raw!r} is not valid YAML: {e}") from None
        node = data
        for part in parts[:-1]:
            child = node.get(part)
            if not isinstance(child, dict):
                child = _Lined()
                child.lines = {}
                node[part] = child
            node = child
        node[parts[-1]] = value
        if isinstance(node, _Lined):
            node.lines[parts[-1]] = 0  # 0 marks "came from --set"
    return data


class _Where:
    def __init__(self, path: str):
        self.path = path

    def at(self, mapping: Any, key: str) -> str:
        line = getattr(mapping, "lines", {}).get(key)
        if line == 0:
            return "--set"
        return f"{self.path}:{line}" if line else self.path


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin in (list, tuple):
        return f"a list of {_type_name(typing.get_args(tp)[0])}"
    if origin is dict:
        k, v = typing.get_args(tp)
        return f"a mapping of {_type_name(k)} to {_type_name(v)}"
    if tp is type(None):
        return "null"
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    return {bool: "true/false", int: "an integer", float: "a number", str: "a string"}.get(tp, str(tp))


def _convert(value: Any, tp: Any, key: str, where: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        errors = []
        for option in typing.get_args(tp):
            try:
                return _convert(value, option, key, where)
            except ConfigError as e:
                errors.append(e)
        raise ConfigError(f"{key} ({where}): expected {_type_name(tp)}, got {value!r}")
    if tp is type(None):
        if value is None:
            return None
    elif origin in (list, tuple):
        if isinstance(value, (list, tuple)):
            inner = typing.get_args(tp)[0]
            return tuple(_convert(v, inner, f"{key}[{i}]", where) for i, v in enumerate(value))
    elif origin is dict:
        if isinstance(value, dict):
            kt, vt = typing.get_args(tp)
            return {_convert(k, kt, key, where): _convert(v, vt, f"{key}[{k!r}]", where) for k, v in value.items()}
    elif tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    elif tp is Any:
        return value
    raise ConfigError(f"{key} ({where}): expected {_type_name(tp)}, got {value!r} ({type(value).__name__})")


def _optional_dataclass(tp: Any) -> type | None:
    """X for a field typed `X | None` where X is a dataclass (an optional section), else None."""
    if typing.get_origin(tp) not in (typing.Union, types.UnionType):
        return None
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    return args[0] if len(args) == 1 and dataclasses.is_dataclass(args[0]) else None


def build(cls: type, data: Any, prefix: str, where: _Where, parent: Any = None, name: str = "") -> Any:
    """Build dataclass `cls` from a raw mapping, validating every key on the way down."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        loc = where.at(parent, name) if parent is not None else where.path
        raise ConfigError(f"{prefix or 'config'} ({loc}): expected a mapping, got {data!r}")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    hints = typing.get_type_hints(cls)
    for key in data:
        if key not in fields:
            dotted = f"{prefix}.{key}" if prefix else str(key)
            near = difflib.get_close_matches(str(key), list(fields), n=1, cutoff=0.6)
            hint = f"; did you mean '{prefix + '.' if prefix else ''}{near[0]}'?" if near else ""
            valid = ", ".join(sorted(fields))
            raise ConfigError(f"unknown key '{dotted}' ({where.at(data, key)}){hint} (valid keys here: {valid})")
    kwargs = {}
    for fname in fields:
        if fname not in data:
            continue
        dotted = f"{prefix}.{fname}" if prefix else fname
        tp = hints[fname]
        inner = _optional_dataclass(tp)
        if inner is not None and data[fname] is None:  # `section: null`
            kwargs[fname] = None
            continue
        if dataclasses.is_dataclass(tp) or inner is not None:
            kwargs[fname] = build(inner or tp, data[fname], dotted, where, data, fname)
            continue
        loc = where.at(data, fname)
        kwargs[fname] = _convert(data[fname], tp, dotted, loc)
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as e:
        # __post_init__ (model.checked's range check, then the cross-field rules) names the
        # offending field in its message: report it at that key. The field named first in the
        # message is the one it is about; a leading "field:" (or "section.field:") is dropped,
        # since the report starts with the dotted key.
        hits = [(m.start(), n) for n in fields if (m := re.search(rf"\b{re.escape(n)}\b", str(e)))]
        field = min(hits)[1] if hits else None
        dotted = f"{prefix}.{field}" if prefix and field else (field or prefix or "config")
        loc = where.at(data, field) if field else where.path
        named = rf"(?:[\w.]*\.)?{re.escape(field)}" if field else re.escape(dotted)
        message = re.sub(rf"^(?:{re.escape(dotted)}|{named}):\s*", "", str(e))
        raise ConfigError(f"{dotted} ({loc}): {message}") from None


def to_dict(obj: Any) -> Any:
    """A plain, JSON-ready form of a config (tuples become lists)."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    return obj
