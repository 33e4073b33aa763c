"""A batch of references -> their stored payloads: the one routine `m3 encode` (pipelines/encode_step.py)
and the serving write-back of cold references (storage/memory_store.py) share, so both store the
same bytes for a reference.

Batch-invariant: the bytes of a reference do not depend on the references sharing its batch. On
CPU torch picks other matmul kernels for very few rows, which round differently in the last bit:
a 5-token reference encoded alone gave other raw-fp32 bytes than in a batch of 8 (its batch padded
to 10 tokens). Every batch is therefore padded to at least MIN_WIDTH tokens (pads are masked,
so this changes no value beyond that rounding); from 16 tokens up, 200 references of 1..127
tokens gave the same bytes alone and in batches of 3, 8, 32 and 64 (32 keeps a margin).
"""

from __future__ import annotations

import numpy as np
import torch

from model.memory import encode_references

MIN_WIDTH = 32


def pad_batch(token_lists: list, pad_id: int, min_width: int = 1) -> torch.Tensor:
    width = max(1, min_width, max(len(t) for t in token_lists))
    out = torch.full((len(token_lists), width), pad_id, dtype=torch.long)
    for i, ids in enumerate(token_lists):
        out[i, : len(ids)] = torch.as_tensor(ids, dtype=torch.long)
    return out


@torch.no_grad()
def encode_tokens(model, codec, token_lists: list) -> tuple[list[bytes], np.ndarray, np.ndarray]:
    """(payloads, positions (B, L, H, k) int16, kept tokens per reference (B,) int16)."""
    width = min(MIN_WIDTH, model.config.ref_max_tokens)
    enc = encode_references(model, pad_batch(token_lists, model.config.pad_id, width))
    payloads = codec.encode_batch(enc.kv)
    return payloads, enc.positions.to(torch.int16).numpy(), enc.mask.sum(dim=1).to(torch.int16).numpy()
