"""Explicit memories: writing them (encode + sparsify a reference) and laying them out for reading.

Writing [paper §3.1-3.3]: a reference (<= ref_max_tokens tokens) is encoded alone, behind
ref_bos ("<s>Reference:"), through the memory layers only. In every memory layer and KV head
each token j is scored by w_j = sum_i exp(q_i . k_j / sqrt(D)) over the reference's tokens i,
with no causal mask and no positions (q, k before RoPE), ref_bos and padding excluded on both
sides; the top-k tokens are kept, their keys after RoPE at their reference positions.
"""

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .rope import apply_rope, rope_for


class EncodedReferences(NamedTuple):
    """The memories of B references, k tokens per memory layer and KV head.

    kv: (B, n_mem_layers, 2, n_kv_heads, k, head_dim), K (after RoPE) then V; zeros in empty slots.
    positions: (B, n_mem_layers, n_kv_heads, k) int64, ascending: the token's RoPE position in
        its reference (ref_bos = 0, so ref_tokens[:, p - 1] is the token); -1 in empty slots.
    mask: (B, k) bool, whether a slot holds a token: a reference with n < k real tokens fills
        the first n slots of every layer and head, the rest are empty.
    """

    kv: Tensor
    positions: Tensor
    mask: Tensor


# References per block of the selection score on CPU: one block's logits (block x Hq x S x S
# float32, 2 MB for the demo model's 8 heads at S = 129) stay in cache between the product and
# the log-sum-exp's passes over them; the whole batch's at once (34 MB for 64 references) did
# not, and the score took a third of an encode pass (BENCHMARKS.md, issue 13). A GPU takes the
# batch whole.
SCORE_BLOCK = 4


def token_log_scores(q: Tensor, k: Tensor, scored: Tensor, combine: str) -> Tensor:
    """log w_j for every KV head: (B, Hkv, S) float32, -inf where token j is not scored.

    q (B, Hq, S, D) and k (B, Hkv, S, D) are taken before RoPE; scored (B, S) marks the tokens
    that take part (neither ref_bos nor padding). The query heads sharing a KV head combine by
    `combine`: "sum" (sum of their w_j), "mean" (same ranking as sum) or "max" (best head).
    Everything stays in log space (log-sum-exp), so long or peaked references cannot overflow.

    Per KV head the logits are laid out key-major, (S_j, group * S_i): token j's row holds every
    query token i of every query head of that KV head, so one log-sum-exp over the contiguous
    last dim sums over heads and tokens at once ("sum"), or over each head's S_i ("max"). The
    1/sqrt(D) scale and the mask of unscored rows i (an additive -inf bias) ride in the same
    baddbmm; no square is scaled or masked apart, and the batch goes by SCORE_BLOCK references.
    """
    B, Hq, S, D = q.shape
    Hkv = k.shape[1]
    group = Hq // Hkv
    bias = torch.zeros(B, 1, 1, S, dtype=torch.float32, device=q.device)
    bias.masked_fill_(~scored[:, None, None, :], float("-inf"))  # rows i that do not take part
    log_w = torch.empty(B, Hkv, S, dtype=torch.float32, device=q.device)
    per_block = SCORE_BLOCK if q.device.type == "cpu" else B
    for lo in range(0, B, per_block):
        hi = min(lo + per_block, B)
        b = hi - lo
        queries = q[lo:hi].float().reshape(b * Hkv, group * S, D).transpose(1, 2)
        logits = torch.baddbmm(
            bias[lo:hi].expand(b, Hkv, group, S).reshape(b * Hkv, 1, group * S),
            k[lo:hi].float().reshape(b * Hkv, S, D),
            queries,
            alpha=1 / math.sqrt(D),
        )  # (b * Hkv, S_j, group * S_i)
        if combine == "max":
            block = logits.view(b, Hkv, S, group, S).logsumexp(dim=-1).amax(dim=-1)
        else:
            block = logits.view(b, Hkv, S, group * S).logsumexp(dim=-1)
        log_w[lo:hi] = block
    if combine == "mean":
        log_w -= math.log(group)
    return log_w.masked_fill_(~scored[:, None, :], float("-inf"))


def top_tokens(log_w: Tensor, k: int) -> Tensor:
    """Positions of the k best tokens per head, (..., k) int64, sorted ascending; -1 pads slots
    beyond the scored tokens, which sort last.

    Ties are common, not rare: in layer 0 the score of a token depends only on its id, so a
    repeated word ties with itself. A stable sort breaks them towards the earlier position,
    which torch.topk does not promise. Sorting the kept positions makes a memory canonical (the
    order inside a memory does not matter to attention), so equal selections give equal tensors.
    """
    S = log_w.shape[-1]
    ranked = log_w.sort(dim=-1, descending=True, stable=True)
    best, score = ranked.indices[..., :k], ranked.values[..., :k]
    order_key = torch.where(score > float("-inf"), best, best + S)  # empty slots after real ones
    pos = order_key.sort(dim=-1).values
    pos = torch.where(pos < S, pos, -1)
    if pos.shape[-1] < k:  # reference tensor narrower than k
        pos = torch.cat([pos, pos.new_full((*pos.shape[:-1], k - pos.shape[-1]), -1)], dim=-1)
    return pos


def gather_tokens(kv: Tensor, pos: Tensor) -> Tensor:
    """kv (B, 2, Hkv, S, D) at positions pos (B, Hkv, k) -> (B, 2, Hkv, k, D), zeros where pos = -1."""
    B, two, H, S, D = kv.shape
    index = pos.clamp(min=0)[:, None, :, :, None].expand(B, two, H, pos.shape[-1], D)
    picked = kv.gather(3, index)
    return torch.where((pos >= 0)[:, None, :, :, None], picked, torch.zeros((), dtype=kv.dtype, device=kv.device))


def encode_references(model, ref_tokens: Tensor, top_k: int | None = None) -> EncodedReferences:
    """Write the explicit memories of a batch of references.

    ref_tokens: (B, T) int64, T <= ref_max_tokens, raw reference token ids padded with pad_id
        (right padding expected; a pad anywhere is ignored). ref_bos is prepended here, so the
        caller must not add it: the reference's token t sits at RoPE position t + 1.
    top_k: tokens kept per memory layer and KV head (default config.mem_top_k); a value
        >= T keeps every real token (dense memories, e.g. for training or tests).

    Runs layers 0 .. n_mem_layers-1 only, and in the last one only the projections: nothing
    after the last memory layer is computed. Gradients flow into the kept keys and values (not
    into the choice of tokens), so call under torch.no_grad() when building a bank.
    """
    cfg = model.config
    if ref_tokens.dim() != 2 or ref_tokens.dtype != torch.long:
        raise ValueError(f"ref_tokens must be int64 (B, T), got {ref_tokens.dtype} {tuple(ref_tokens.shape)}")
    B, T = ref_tokens.shape
    if T > cfg.ref_max_tokens:
        raise ValueError(f"references of {T} tokens exceed ref_max_tokens={cfg.ref_max_tokens}")
    k = cfg.mem_top_k if top_k is None else top_k
    if k < 1:
        raise ValueError(f"top_k must be >= 1, got {k}")
    if (ref_tokens == cfg.ref_bos_id).any():
        raise ValueError("ref_tokens contain ref_bos_id: pass raw references, it is prepended here")

    tokens = torch.cat([ref_tokens.new_full((B, 1), cfg.ref_bos_id), ref_tokens], dim=1)
    real = tokens != cfg.pad_id  # ref_bos included: it is the attention sink
    scored = real.clone()
    scored[:, 0] = False  # ref_bos is never scored nor kept
    S = T + 1
    cos, sin = rope_for(cfg, torch.arange(S, device=tokens.device))
    # Pads only at the end (what every caller passes): a real token's causal window holds no pad,
    # so the fused causal kernel gives the real tokens exactly what the masked one does (pad rows
    # differ, and nothing reads them). A pad between real tokens needs the explicit mask.
    interior_pad = bool((real[:, 1:] & ~real[:, :-1]).any())
    n_real = scored.sum(dim=1, keepdim=True)
    # k at least every reference's length (the demo keeps 128 of <= 128 tokens): the top k hold
    # every scored token whatever the scores, in position order (top_tokens), so the score, and
    # the last memory layer's queries that only it reads, are skipped; the same positions result.
    keep_all = B == 0 or k >= int(n_real.max())
    per_block = max(1, ENCODE_ROWS // S) if tokens.device.type == "cpu" else B
    parts = [
        _encode_block(
            model,
            tokens[lo : lo + per_block],
            real[lo : lo + per_block],
            scored[lo : lo + per_block],
            k,
            cos,
            sin,
            interior_pad,
            keep_all,
        )
        for lo in range(0, B, per_block)
    ]
    kv, pos = (
        (parts[0][0], parts[0][1])
        if len(parts) == 1
        else (torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]))
    )
    mask = torch.arange(k, device=tokens.device)[None, :] < n_real  # same for every layer and head
    return EncodedReferences(kv, pos, mask)


# Token rows (references x (T + 1)) per pass through the memory layers on CPU: a block's
# activations (2048 x mlp_hidden float32 = 6 MB for the demo model) stay near the cache between
# the matmuls and the elementwise ops around them (norms, RoPE, SiLU, residual adds), which the
# whole batch's did not: 64 x 129 rows at once encoded 18 % fewer references per second than
# 16 at a time (BENCHMARKS.md, issue 13). A reference never meets its batch neighbours, so only
# the matmuls' row counts change, as between any two batch sizes (which may round a value's
# last bit differently: model/ref_batches.py). A GPU takes the batch whole.
ENCODE_ROWS = 2048


def _encode_block(
    model,
    tokens: Tensor,
    real: Tensor,
    scored: Tensor,
    k: int,
    cos: Tensor,
    sin: Tensor,
    interior_pad: bool,
    keep_all: bool,
) -> tuple[Tensor, Tensor]:
    """encode_references for the references of one block: (kv, positions) of every memory layer."""
    cfg = model.config
    S = tokens.shape[1]
    group = cfg.n_heads // cfg.n_kv_heads
    every = None
    if keep_all:  # what top_tokens keeps when all scored tokens fit: each of them, ascending
        flat = torch.zeros(scored.shape, device=tokens.device).masked_fill_(~scored, float("-inf"))
        every = top_tokens(flat[:, None, :].expand(-1, cfg.n_kv_heads, -1), k)
    attn_mask = None
    if interior_pad:
        causal = torch.ones(S, S, dtype=torch.bool, device=tokens.device).tril()
        attn_mask = (causal[None] & real[:, None, :])[:, None]  # (B, 1, S, S): no query reads a pad
    x = model.tok_emb(tokens)
    kv_layers, pos_layers = [], []
    for layer in range(cfg.n_mem_layers):
        block = model.blocks[layer]
        last = layer == cfg.n_mem_layers - 1
        # the block's forward, walked by hand: the score needs q and k before RoPE
        if keep_all and last:
            q, (key, v) = None, block.attn.kv(block.attn_norm(x))
        else:
            q, key, v = block.attn.qkv(block.attn_norm(x))
        # the choice of tokens takes no gradient: no graph is kept through the score's squares
        pos = (
            every if keep_all else top_tokens(token_log_scores(q.detach(), key.detach(), scored, cfg.score_combine), k)
        )
        key = apply_rope(key, cos, sin)
        kv_layers.append(gather_tokens(torch.stack([key, v], dim=1), pos))
        pos_layers.append(pos)
        if last:
            break  # no compute after the last memory layer
        if attn_mask is None:
            # K/V read in place by their query heads (enable_gqa), not copied group times
            y = F.scaled_dot_product_attention(apply_rope(q, cos, sin), key, v, is_causal=True, enable_gqa=group > 1)
            x = x + block.attn.wo(y.transpose(1, 2).reshape(*x.shape[:2], -1))
        else:
            x = x + block.attn.attend(apply_rope(q, cos, sin), key, v, attn_mask)
        x = x + _mlp(block.mlp, block.mlp_norm(x))
    return torch.stack(kv_layers, dim=1), torch.stack(pos_layers, dim=1)


def _mlp(mlp, h: Tensor) -> Tensor:
    """mlp(h), the SwiGLU in place when no gradient is taken: the same values with two
    (rows x mlp_hidden) temporaries fewer (4 % of an encode pass on CPU, BENCHMARKS.md issue 13)."""
    if torch.is_grad_enabled():
        return mlp(h)
    gate = F.silu(mlp.w_gate(h), inplace=True)
    return mlp.w_down(gate.mul_(mlp.w_up(h)))


# ---------------------------------------------------------------------------------------------
# Reading: layout of the memories attended by a forward pass


def check_memories(cfg, memories: Tensor, mem_mask: Tensor | None, batch: int, n_chunks: int):
    """Validate (B, n_chunks, M, n_mem_layers, 2, n_kv_heads, k, head_dim) memories and their
    (B, n_chunks, M, k) mask, filling an all-valid mask when none is given."""
    want = f"(B={batch}, n_chunks={n_chunks}, M, {cfg.n_mem_layers}, 2, {cfg.n_kv_heads}, k, {cfg.head_dim})"
    if memories.dim() != 8:
        raise ValueError(f"memories must have shape {want}, got {tuple(memories.shape)}")
    B, C, M, L, two, H, k, D = memories.shape
    if (B, C, L, two, H, D) != (batch, n_chunks, cfg.n_mem_layers, 2, cfg.n_kv_heads, cfg.head_dim):
        raise ValueError(f"memories must have shape {want}, got {tuple(memories.shape)}")
    if mem_mask is None:
        return memories, torch.ones(B, C, M, k, dtype=torch.bool, device=memories.device)
    if mem_mask.dtype != torch.bool or tuple(mem_mask.shape) != (B, C, M, k):
        raise ValueError(f"mem_mask must be bool {(B, C, M, k)}, got {mem_mask.dtype} {tuple(mem_mask.shape)}")
    return memories, mem_mask


def memory_pool(memories: Tensor, mem_mask: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Flatten every chunk's memories into one key/value pool per memory layer.

    memories (B, C, M, L, 2, H, k, D) -> kv (L, 2, B, H, C*M*k, D), with the chunk that owns
    each pool entry (C*M*k,) and whether it holds a token (B, C*M*k).
    """
    B, C, M, L, two, H, k, D = memories.shape
    kv = memories.permute(3, 4, 0, 5, 1, 2, 6, 7).reshape(L, two, B, H, C * M * k, D)
    key_chunk = torch.arange(C, device=memories.device).repeat_interleave(M * k)
    return kv, key_chunk, mem_mask.reshape(B, C * M * k)


def memory_visibility(q_chunk: Tensor, key_chunk: Tensor, key_valid: Tensor) -> Tensor:
    """(B, Tq, P) bool: a query sees a pool entry iff it belongs to the query's own chunk and
    holds a token. q_chunk (Tq,) is -1 for the sink, which sees no memory."""
    return (q_chunk[:, None] == key_chunk[None, :])[None] & key_valid[:, None, :]


def chunk_windows(kv: Tensor, mask: Tensor, window: int) -> tuple[Tensor, Tensor]:
    """Continual-training layout [paper §3.6]: each chunk retrieves one reference and attends to
    the references of itself and the previous window-1 chunks.

    kv (B, C, n_mem_layers, 2, H, k, D) and mask (B, C, k), one reference per chunk ->
    (B, C, window, n_mem_layers, 2, H, k, D) and (B, C, window, k), oldest first; windows that
    reach before chunk 0 get empty slots. Indexing only, so gradients flow back to kv.
    """
    C = kv.shape[1]
    source = (
        torch.arange(C, device=kv.device)[:, None] - torch.arange(window - 1, -1, -1, device=kv.device)[None, :]
    )  # (C, window)
    exists = source >= 0
    source = source.clamp(min=0)
    empty_kv = ~exists.view(1, C, window, *([1] * (kv.dim() - 2)))
    windows = kv[:, source].masked_fill(empty_kv, 0)  # zeros, like encode's empty slots
    return windows, mask[:, source] & exists[None, :, :, None]


def no_memories(cfg, batch: int, n_chunks: int, device=None, dtype=torch.float32) -> tuple[Tensor, Tensor]:
    """Zero memories for every chunk: (B, n_chunks, 0, n_mem_layers, 2, n_kv_heads, 0, head_dim)
    and an empty (B, n_chunks, 0, 0) mask.

    `model(tokens, *no_memories(...))` is the no-memory baseline a model trained with memory is
    in distribution for: the ref_bos sink is kept and the context sits at the positions it
    always had (from ctx_pos_offset on). `model(tokens)` instead drops the sink and shifts the
    context to position 0, which only a model trained without memory (warmup) has seen.
    """
    shape = (batch, n_chunks, 0, cfg.n_mem_layers, 2, cfg.n_kv_heads, 0, cfg.head_dim)
    return (
        torch.zeros(shape, device=device, dtype=dtype),
        torch.zeros(batch, n_chunks, 0, 0, dtype=torch.bool, device=device),
    )


def served_memories(kv: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """The serving schedule [paper §3.1] laid out for a full forward: chunk c reads the memories
    retrieved with chunk c-1's text as the query, chunk 0 reads none (it is the prompt, or in
    training the chunk no earlier text retrieved for).

    kv (B, C, M, n_mem_layers, 2, H, k, D) and mask (B, C, M, k), row c = what chunk c's text
    retrieved -> the same shapes, shifted one chunk later. Indexing only: gradients flow to kv.
    """
    shifted = torch.cat([torch.zeros_like(kv[:, :1]), kv[:, :-1]], dim=1)
    shifted_mask = torch.cat([torch.zeros_like(mask[:, :1]), mask[:, :-1]], dim=1)
    return shifted, shifted_mask
