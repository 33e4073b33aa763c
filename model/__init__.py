"""The Memory3 model in pure torch (no Ray, no Lance): transformer with memory layers,
reference encoder with top-k sparsification, KV-cache decoding, checkpoints and lineage hash.

The names below are loaded on first use (PEP 562), not when the package is imported: the bottom
layer's torch-free modules (model.errors, model.checked, model.config) are imported by every
command and every Ray worker, and importing torch costs them seconds they never use.
"""

from __future__ import annotations

import importlib

_WHERE = {
    "ModelConfig": "config",
    "PRESETS": "config",
    "Memory3": "transformer",
    "encode_references": "memory",
    "EncodedReferences": "memory",
    "chunk_windows": "memory",
    "KVCache": "decode",
    "generate": "decode",
    "save_model": "checkpoint",
    "load_model": "checkpoint",
    "model_hash": "checkpoint",
}

__all__ = list(_WHERE)


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module 'model' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
    globals()[name] = value  # once loaded, an ordinary attribute
    return value


def __dir__():
    return sorted(set(globals()) | set(_WHERE))
