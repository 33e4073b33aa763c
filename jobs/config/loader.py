"""Load YAML into typed, frozen dataclasses, failing early with errors a person can act on.

Every error names the dotted key, where it came from (file:line, the --set override or the flag
that stands for one) and what was expected; a misspelled key gets the nearest valid name
suggested. Nothing here knows the pipeline's schema: `jobs.config` declares it, this module
enforces it.

This module reads the file (following `extends:`), applies the overrides and walks the mapping
into the sections; every type, range and cross-field rule is the dataclass's own
(`model.checked.check_fields` and the rules in __post_init__), whose `FieldError` names the field
this module reports at its key. A config built in code is checked by the same code.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from pathlib import Path
from typing import Any, Sequence

import yaml

from model.checked import FieldError
from model.config import ModelConfig
from model.errors import M3Error

EXTENDS = "extends"


class ConfigError(M3Error, ValueError):
    """A config problem, phrased for the person who wrote the file."""


class _Lined(dict):
    """A YAML mapping that remembers where each key came from: an int is a line of the file
    being loaded, a string a whole place ("base.yaml:12", "--set", "--mode")."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.lines: dict[str, int | str] = {}


class _LineLoader(yaml.SafeLoader):
    pass


def _construct_lined(loader: _LineLoader, node: yaml.MappingNode) -> _Lined:
    mapping = _Lined(loader.construct_mapping(node, deep=True))
    mapping.lines = {k.value: k.start_mark.line + 1 for k, _ in node.value}
    return mapping


_LineLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_lined)


def _lines(mapping: Any) -> dict:
    return getattr(mapping, "lines", {})


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


def _placed(mapping: Any, path: str) -> None:
    """Turn the line numbers of a base file's keys into whole places (`base.yaml:12`): once
    merged, the loaded file's own lines are the bare numbers."""
    if isinstance(mapping, _Lined):
        mapping.lines = {k: f"{path}:{v}" if isinstance(v, int) else v for k, v in mapping.lines.items()}
    if isinstance(mapping, dict):
        for value in mapping.values():
            _placed(value, path)


def merge(base: dict, child: dict) -> dict:
    """`child` over `base`: mappings merge key by key, anything else (a list, a value, null)
    replaces what the base had."""
    out = _Lined({**base})
    out.lines = {**_lines(base)}
    for key, value in child.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            value = merge(base[key], value)
        out[key] = value
        if key in _lines(child):
            out.lines[key] = _lines(child)[key]
    return out


def read_config(path: str | Path, _chain: tuple[Path, ...] = ()) -> dict:
    """A config file with its `extends:` chain merged in: `extends: demo.yaml` (a path relative
    to the file that says it) reads that file first and lays this one over it."""
    data = read_yaml(path)
    me = Path(path).resolve()
    chain = (*_chain, me)
    if EXTENDS not in data:
        return data
    base = data.pop(EXTENDS)
    where = f"{path}:{_lines(data).pop(EXTENDS, '?')}"
    if not isinstance(base, str) or not base.strip():
        raise ConfigError(
            f"{EXTENDS} ({where}): expected the path of another config file, relative to this one, got {base!r}"
        )
    base_path = Path(path).parent / base
    if base_path.resolve() in chain:
        cycle = " -> ".join(str(p) for p in (*chain[chain.index(base_path.resolve()) :], base_path.resolve()))
        raise ConfigError(
            f"{EXTENDS} ({where}): a cycle ({cycle}): a config cannot extend itself, "
            f"directly or through the files it extends"
        )
    if not base_path.is_file():
        raise ConfigError(f"{EXTENDS} ({where}): config file not found: {base_path}")
    parent = read_config(base_path, chain)
    _placed(parent, str(base_path))
    return merge(parent, data)


Override = str | tuple[str, Any, str]


def apply_overrides(data: dict, overrides: Sequence[Override]) -> dict:
    """Apply overrides onto the raw mapping: `dotted.key=value` (the value parsed as YAML), or
    (dotted key, value, flag) for a command-line flag that stands for `--set dotted.key=value`
    (the value as the flag parsed it; errors name the flag)."""
    for item in overrides:
        if isinstance(item, tuple):
            key, value, origin = item
            parts = key.split(".")
        else:
            if "=" not in item:
                raise ConfigError(f"--set {item!r}: expected dotted.key=value")
            key, raw = item.split("=", 1)
            parts, origin = key.strip().split("."), "--set"
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
                child = node[part] = _Lined()
            node = child
        node[parts[-1]] = value
        if isinstance(node, _Lined):
            node.lines[parts[-1]] = origin
    return data


class _Where:
    def __init__(self, path: str):
        self.path = path

    def at(self, mapping: Any, key: str) -> str:
        line = _lines(mapping).get(key)
        if isinstance(line, str):
            return line
        return f"{self.path}:{line}" if line else self.path


def _optional_dataclass(tp: Any) -> type | None:
    """X for a field typed `X | None` where X is a dataclass (an optional section), else None."""
    if typing.get_origin(tp) not in (typing.Union, types.UnionType):
        return None
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    return args[0] if len(args) == 1 and dataclasses.is_dataclass(args[0]) else None


def located(data: Any, dotted: str, where: _Where, place: str | None = None) -> str:
    """Where the key `dotted` (`model.vocab_size`, `corpus.paths[1]`) of raw mapping `data` came
    from; a key with no place of its own (inside a mapping given whole to --set, a preset's) is
    at its section's (`place`, the section's own)."""
    place = place or where.path
    *parents, last = dotted.split(".")
    for part in [*parents, last.split("[")[0]]:
        if not isinstance(data, dict):
            break
        if part in _lines(data):
            place = where.at(data, part)
        data = data.get(part)
    return place


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
        value, tp = data[fname], hints[fname]
        inner = _optional_dataclass(tp)
        if inner is not None and value is None:  # `section: null`
            kwargs[fname] = None
        elif dataclasses.is_dataclass(tp) or inner is not None:
            kwargs[fname] = build(inner or tp, value, f"{prefix}.{fname}" if prefix else fname, where, data, fname)
        else:
            kwargs[fname] = value
    try:
        return cls(**kwargs)
    except FieldError as e:
        dotted = f"{prefix}.{e.field}" if prefix else e.field
        section = where.at(parent, name) if parent is not None else None
        raise ConfigError(f"{dotted} ({located(data, e.field, where, section)}): {e.reason}") from None


def to_dict(obj: Any) -> Any:
    """A plain, JSON-ready form of a config (tuples become lists)."""
    if isinstance(obj, ModelConfig):  # without the optional fields at their defaults (model/config.py):
        return to_dict(obj.to_dict())  # the hashes that key existing banks' stages stay what they were
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    return obj
