"""The pieces of a training step that are pure torch: the LM loss and the continual-train memories.

Continual training [paper §3.6, PAPER.md §3.5]: every chunk of mem_chunk_size tokens is paired
with one reference (or none), the references are encoded *in the same step with the current
weights*, and chunk c attends to the memories of chunks c-window+1 .. c. The encoding is one
batched `encode_references` call over all B * n_chunks references (never a loop over chunks),
which is what makes a continual step cost about two warmup steps rather than n_chunks of them.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import Tensor

from .memory import chunk_windows, encode_references

__all__ = ["lm_loss", "continual_memories", "n_chunks"]


def n_chunks(seq_len: int, chunk_size: int) -> int:
    return (seq_len + chunk_size - 1) // chunk_size


def lm_loss(model, tokens: Tensor, memories: Tensor | None = None,
            mem_mask: Tensor | None = None, pad_id: int | None = None) -> Tensor:
    """Mean next-token cross-entropy over the targets that are not padding.

    model: a Memory3 or anything that forwards to one (a DeepSpeed engine); pad_id defaults to
    the model's config. The loss is float32 whatever the model's dtype, so bf16 logits do not
    round the sum.
    """
    if pad_id is None:
        pad_id = _config(model).pad_id
    logits = model(tokens, memories, mem_mask)
    targets = tokens[:, 1:]
    return F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]),
                           targets.reshape(-1), ignore_index=pad_id)


def continual_memories(model, ref_tokens: Tensor, ref_valid: Tensor, window: int = 5,
                       sparsify: bool = False, grad_through_refs: bool = True
                       ) -> tuple[Tensor, Tensor]:
    """Encode each chunk's neighbor reference with the current weights and lay the memories out
    so that chunk c reads the references of chunks c-window+1 .. c.

    ref_tokens: (B, n_chunks, T_ref) int64, raw reference ids right-padded with pad_id (a chunk
        without a neighbor may hold anything: ref_valid masks it).
    ref_valid: (B, n_chunks) bool, whether the chunk has a neighbor.
    sparsify: keep the model's mem_top_k tokens per layer and KV head (as at inference), else
        every token (dense memories).
    grad_through_refs: let the loss train the weights through the encoding too; if False the
        encoding runs under no_grad (cheaper, and the references only act as inputs).

    Returns memories (B, n_chunks, window, n_mem_layers, 2, n_kv_heads, k, head_dim) and their
    mask (B, n_chunks, window, k), ready for `model(tokens, memories, mem_mask)`.
    """
    if ref_tokens.dim() != 3 or ref_valid.shape != ref_tokens.shape[:2]:
        raise ValueError(f"ref_tokens must be (B, n_chunks, T) and ref_valid (B, n_chunks), got "
                         f"{tuple(ref_tokens.shape)} and {tuple(ref_valid.shape)}")
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    cfg = _config(model)
    B, C, T = ref_tokens.shape
    # a chunk without a neighbor is encoded as all padding: no scored token, an all-False mask,
    # so it costs a row of the batch but cannot leak anything into attention
    flat = torch.where(ref_valid[:, :, None], ref_tokens, cfg.pad_id).reshape(B * C, T)
    top_k = cfg.mem_top_k if sparsify else T
    ctx = contextlib.nullcontext() if grad_through_refs else torch.no_grad()
    with ctx:
        enc = encode_references(_module(model), flat, top_k=top_k)
    kv = enc.kv.reshape(B, C, *enc.kv.shape[1:])
    mask = enc.mask.reshape(B, C, -1) & ref_valid[:, :, None]
    return chunk_windows(kv, mask, window)


def _module(model):
    """The Memory3 behind a wrapper (DeepSpeed engine, DDP): encoding walks its blocks by hand."""
    return getattr(model, "module", model)


def _config(model):
    return _module(model).config
