"""Chunk-local attention for the memory layers of a full forward (training, evaluation, prefill
without a cache): each chunk's queries meet only their own chunk's memory keys.

Why: as one SDPA call with a dense (Tq, P + S) mask, every query pays for the whole memory pool
of the sequence (all C chunks x M memories x k tokens) although it may read only its own chunk's
M x k. With dense memories (k = 128) and C = 8 chunks the pool is 8x a chunk's share, and the
masked attention was half of a continual training step on CPU. Here the queries are cut into
their chunks and each chunk attends, in one batched SDPA call over (batch x chunk), to
[its own M x k memory keys | the sink and the context], causal on the context part: the same
rule, the same result as the dense mask (tests compare both with the float64 reference), about
(M k + S) / (C M k + S) of the work.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor


@dataclass
class ChunkLocalMask:
    """The memory layers' rule for a forward whose residual stream is [sink, context tokens]:
    context token t (slot t + 1) belongs to chunk t // chunk_size, reads the pool entries of that
    chunk that hold a token (per_chunk of them per chunk, in chunk order), and the slots up to its
    own; the sink (slot 0) reads only itself."""

    chunk_size: int
    per_chunk: int
    valid: Tensor  # (B, C, per_chunk) bool


def chunk_local_attend(q: Tensor, k: Tensor, v: Tensor, m: ChunkLocalMask) -> Tensor:
    """q (B, Hq, 1 + T, D) for [sink, context]; k, v (B, Hkv, C * per_chunk + 1 + T, D) for
    [memory pool, sink, context] -> (B, Hq, 1 + T, D)."""
    B, Hq, Tq, D = q.shape
    Hkv = k.shape[1]
    C, cs, Mk = m.valid.shape[1], m.chunk_size, m.per_chunk
    P = C * Mk
    T = Tq - 1
    if k.shape[2] != P + Tq:
        raise ValueError(f"expected {P} pool entries and {Tq} slots of keys, got {k.shape[2]}")
    # the sink attends to itself alone: its output is its own value
    y_sink = v[:, :, P : P + 1].repeat_interleave(Hq // Hkv, dim=1)
    pad = C * cs - T
    qc = F.pad(q[:, :, 1:], (0, 0, 0, pad)).view(B, Hq, C, cs, D).transpose(1, 2).reshape(B * C, Hq, cs, D)

    def per_chunk(x: Tensor) -> Tensor:  # [own memories | sink and context] for every chunk
        mem = x[:, :, :P].view(B, Hkv, C, Mk, D).transpose(1, 2)
        ctx = x[:, None, :, P:].expand(B, C, Hkv, Tq, D)
        both = torch.cat([mem, ctx], dim=3).reshape(B * C, Hkv, Mk + Tq, D)
        return both.repeat_interleave(Hq // Hkv, dim=1) if Hq != Hkv else both

    q_slot = torch.arange(C * cs, device=q.device).view(C, cs, 1) + 1  # slot of each chunk's queries
    causal = torch.arange(Tq, device=q.device).view(1, 1, Tq) <= q_slot  # (C, cs, Tq)
    mask = torch.cat([m.valid[:, :, None, :].expand(B, C, cs, Mk), causal.expand(B, C, cs, Tq)], dim=3)
    y = F.scaled_dot_product_attention(qc, per_chunk(k), per_chunk(v), attn_mask=mask.reshape(B * C, 1, cs, Mk + Tq))
    y = y.view(B, C, Hq, cs, D).transpose(1, 2).reshape(B, Hq, C * cs, D)[:, :, :T]
    return torch.cat([y_sink, y], dim=2)
