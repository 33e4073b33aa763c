"""The Memory3 model in pure torch (no Ray, no Lance): transformer with memory layers,
reference encoder with top-k sparsification, KV-cache decoding, checkpoints and lineage hash."""

from .checkpoint import load_model, model_hash, save_model
from .config import PRESETS, ModelConfig
from .decode import KVCache, generate
from .memory import EncodedReferences, chunk_windows, encode_references
from .transformer import Memory3

__all__ = ["ModelConfig", "PRESETS", "Memory3", "encode_references", "EncodedReferences",
           "chunk_windows", "KVCache", "generate", "save_model", "load_model", "model_hash"]
