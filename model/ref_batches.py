"""A batch of references -> their stored payloads: the one routine `m3 encode` (pipelines/encode_step.py)
and the serving write-back of cold references (storage/memory_store.py) share, so both store the
same bytes for a reference.

Batch-invariant: the bytes of a reference do not depend on the references sharing its batch.
The padded width does change them: torch's CPU kernels round the last bit differently for other
row counts and widths (unpadded, a 5-token reference alone gave other raw-fp32 bytes than in a
batch padded to 10 tokens; padded to the batch's longest reference, 10 to 76 of 120 references of
1..127 tokens differed alone and in sorted batches of 3 to 64). So a reference is always encoded
at its own width, width_of(n): its length rounded up to WIDTH_STEP, at least MIN_WIDTH, and a
batch is encoded in groups of one width; then 0 of those 120 differed, alone or in batches of
3, 8, 32 and 64 (pads are masked, so padding changes no value beyond that rounding). It costs
~10 % more encode time than padding to the batch's longest reference.
"""

from __future__ import annotations

import numpy as np
import torch

from model.memory import encode_references

MIN_WIDTH = 32
WIDTH_STEP = 16


def pad_batch(token_lists: list, pad_id: int, min_width: int = 1) -> torch.Tensor:
    width = max(1, min_width, max(len(t) for t in token_lists))
    out = torch.full((len(token_lists), width), pad_id, dtype=torch.long)
    for i, ids in enumerate(token_lists):
        out[i, : len(ids)] = torch.as_tensor(ids, dtype=torch.long)
    return out


def width_of(n_tokens: int, ref_max_tokens: int) -> int:
    """The padded width a reference of n_tokens is always encoded at: its own, not its batch's."""
    return min(ref_max_tokens, max(MIN_WIDTH, -(-n_tokens // WIDTH_STEP) * WIDTH_STEP))


@torch.no_grad()
def encode_tokens(model, codec, token_lists: list) -> tuple[list[bytes], np.ndarray, np.ndarray]:
    """(payloads, positions (B, L, H, k) int16, kept tokens per reference (B,) int16), in the
    order given. References are encoded in groups of one width (width_of), so a reference's bytes
    never depend on the longest reference beside it."""
    R = model.config.ref_max_tokens
    groups: dict[int, list[int]] = {}
    for i, t in enumerate(token_lists):
        groups.setdefault(width_of(len(t), R), []).append(i)
    payloads: list = [None] * len(token_lists)
    positions = kept = None
    for width, idx in groups.items():
        enc = encode_references(model, pad_batch([token_lists[i] for i in idx], model.config.pad_id, width))
        pos, k = enc.positions.to(torch.int16).numpy(), enc.mask.sum(dim=1).to(torch.int16).numpy()
        if positions is None:
            positions = np.empty((len(token_lists), *pos.shape[1:]), dtype=np.int16)
            kept = np.empty(len(token_lists), dtype=np.int16)
        for j, p in zip(idx, codec.encode_batch(enc.kv)):
            payloads[j] = p
        positions[idx], kept[idx] = pos, k
    return payloads, positions, kept
