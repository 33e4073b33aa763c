"""The pieces of a training step that are pure torch: the LM loss and the continual-train memories.

Continual training [paper §3.6, §5.3; docs/paper.md]: the references retrieved for every chunk of
mem_chunk_size tokens are encoded *in the same step with the current weights* (one batched
`encode_references` call over all of them, never a loop over chunks), which is what makes a
continual step cost about two warmup steps rather than n_chunks of them. Which chunk reads
which memories is the schedule:

- "paper" (§3.6): each chunk retrieves one reference with its own text and attends to its own
  and the previous window-1 chunks' references. The chunk's own text chose its memory: a
  look-ahead that inference never has.
- "serving" (§3.1, what `m3 generate` and `m3 eval` do): chunk c reads the M references that
  chunk c-1's text retrieved; chunk 0 reads none. Training then sees what serving will give.

"Train as you serve" also covers the memory itself: `top_k` keeps the tokens the bank keeps
(the model's mem_top_k) and `codec` passes the memories through the bank's codec (encode then
decode, straight-through for gradients), so the model learns to read what a fetch returns.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import Tensor

from .memory import chunk_windows, encode_references, served_memories

__all__ = ["lm_loss", "continual_memories", "n_chunks", "SCHEDULES", "through_codec"]

SCHEDULES = ("paper", "serving")


def n_chunks(seq_len: int, chunk_size: int) -> int:
    return (seq_len + chunk_size - 1) // chunk_size


def lm_loss(
    model, tokens: Tensor, memories: Tensor | None = None, mem_mask: Tensor | None = None, pad_id: int | None = None
) -> Tensor:
    """Mean next-token cross-entropy over the targets that are not padding.

    model: a Memory3 or anything that forwards to one (a DeepSpeed engine); pad_id defaults to
    the model's config. The loss is float32 whatever the model's dtype, so bf16 logits do not
    round the sum.
    """
    if pad_id is None:
        pad_id = _config(model).pad_id
    logits = model(tokens, memories, mem_mask)
    targets = tokens[:, 1:]
    return F.cross_entropy(
        logits[:, :-1].float().reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=pad_id
    )


def through_codec(kv: Tensor, codec) -> Tensor:
    """kv (N, n_mem_layers, 2, H, k, D) as a reader gets it back from the bank's codec, with the
    gradient of the identity (straight-through): the forward sees the coding error, the
    backward trains the weights as if there were none."""
    if codec is None or kv.shape[0] == 0:
        return kv
    with torch.no_grad():
        coded = codec.round_trip(kv.detach()).to(device=kv.device, dtype=kv.dtype)
    return kv + (coded - kv).detach()


def continual_memories(
    model,
    ref_tokens: Tensor,
    ref_valid: Tensor,
    window: int = 5,
    sparsify: bool = False,
    grad_through_refs: bool = True,
    schedule: str = "paper",
    codec=None,
    unique: Tensor | None = None,
    slot: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Encode every chunk's retrieved references with the current weights and lay the memories
    out as `schedule` reads them.

    ref_tokens: (B, n_chunks, T_ref) or (B, n_chunks, M, T_ref) int64, the references chunk c's
        text retrieved (best first), raw ids right-padded with pad_id; ref_valid: (B, n_chunks)
        or (B, n_chunks, M) bool, whether the slot holds one (else it may hold anything).
    window: the "paper" schedule's chunks of references a chunk reads (its own and the
        previous window-1; only the best reference of each); unused by "serving".
    sparsify: keep the model's mem_top_k tokens per layer and KV head (as the bank does), else
        every token (dense memories).
    grad_through_refs: let the loss train the weights through the encoding too; if False the
        encoding runs under no_grad (cheaper, and the references only act as inputs).
    codec: a model.codecs.Codec the memories pass through (straight-through), or None.
    unique, slot: the same references given once each, (U, T_ref), and which one every slot
        holds, (B, n_chunks, M) int64 (-1 = none; ref_valid is then slot >= 0). Adjacent chunks
        mostly retrieve the same references, so encoding each once is several times cheaper
        than encoding every slot, with the same result.

    Returns memories (B, n_chunks, M', n_mem_layers, 2, n_kv_heads, k, head_dim) and their
    mask (B, n_chunks, M', k), ready for `model(tokens, memories, mem_mask)`; M' = window
    ("paper") or M ("serving").
    """
    if ref_tokens.dim() == 3:
        ref_tokens, ref_valid = ref_tokens[:, :, None], ref_valid[:, :, None]
    if ref_tokens.dim() != 4 or ref_valid.shape != ref_tokens.shape[:3]:
        raise ValueError(
            f"ref_tokens must be (B, n_chunks, [M,] T) and ref_valid (B, n_chunks, [M]), got "
            f"{tuple(ref_tokens.shape)} and {tuple(ref_valid.shape)}"
        )
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    cfg = _config(model)
    if schedule == "paper":  # one reference per chunk: its best
        ref_tokens, ref_valid = ref_tokens[:, :, :1], ref_valid[:, :, :1]
        slot = None if slot is None else slot[:, :, :1]
    else:  # the last chunk's retrieval is read by no chunk: do not encode it
        ref_tokens, ref_valid = ref_tokens[:, :-1], ref_valid[:, :-1]
        slot = None if slot is None else slot[:, :-1]
    B, C, M, T = ref_tokens.shape
    top_k = cfg.mem_top_k if sparsify else T
    ctx = contextlib.nullcontext() if grad_through_refs else torch.no_grad()
    if unique is not None and len(unique):
        # encode only the references some slot still reads (the paper's schedule reads rank 0,
        # the serving one never reads the last chunk's retrieval)
        used = torch.unique(slot[slot >= 0])
        remap = torch.full((len(unique),), -1, dtype=torch.long, device=slot.device)
        remap[used] = torch.arange(len(used), device=slot.device)
        unique, slot = unique[used], torch.where(slot >= 0, remap[slot.clamp(min=0)], -1)
    if unique is not None and len(unique):
        with ctx:
            enc = encode_references(_module(model), unique, top_k=top_k)
        held = slot >= 0
        kv = through_codec(enc.kv, codec)[slot.clamp(min=0)]
        kv = kv * held.view(B, C, M, *([1] * (kv.dim() - 3))).to(kv.dtype)  # zeros, like encode's empty slots
        mask = enc.mask[slot.clamp(min=0)] & held[..., None]
    else:
        # a slot without a reference is encoded as all padding: no scored token, an all-False
        # mask, so it costs a row of the batch but cannot leak anything into attention
        flat = torch.where(ref_valid[..., None], ref_tokens, cfg.pad_id).reshape(B * C * M, T)
        with ctx:
            enc = encode_references(_module(model), flat, top_k=top_k)
        kv = through_codec(enc.kv, codec).reshape(B, C, M, *enc.kv.shape[1:])
        mask = enc.mask.reshape(B, C, M, -1) & ref_valid[..., None]
    if schedule == "paper":
        return chunk_windows(kv[:, :, 0], mask[:, :, 0], window)
    # pad back the last chunk's row, then shift: chunk c reads row c-1
    kv = torch.cat([kv, torch.zeros_like(kv[:, :1])], dim=1)
    mask = torch.cat([mask, torch.zeros_like(mask[:, :1])], dim=1)
    return served_memories(kv, mask)


def _module(model):
    """The Memory3 behind a wrapper (DeepSpeed engine, DDP): encoding walks its blocks by hand."""
    return getattr(model, "module", model)


def _config(model):
    return _module(model).config
