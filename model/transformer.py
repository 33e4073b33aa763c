"""The Memory3 transformer: a LLaMA-style decoder whose first layers can read explicit memories.

Pre-norm RMSNorm, RoPE ("rotate half" layout), grouped-query attention through
F.scaled_dot_product_attention, SwiGLU MLP, no biases, optional tied embeddings.

Reading memories (paper eq. 4, docs/paper.md): with memories, the residual stream is
[ref_bos, context...]. ref_bos is the attention sink of every layer; it attends only to
itself, so its hidden state is the same constant as at position 0 of every encoded reference.
In memory layers (0 .. n_mem_layers-1) each context token additionally attends to the keys
and values of the memories retrieved for its own chunk, placed before the context keys. Those
keys carry the RoPE positions they had inside their reference (1..ref_max_tokens, "parallel
positions"); the context starts at position ref_max_tokens + 1. All chunks are handled by one
attention call per layer with a block mask, never a Python loop over chunks: SDPA with a dense
mask when decoding from a cache, chunk by chunk in a whole forward (each chunk's queries meet
only their own memories; model/chunk_attention.py), FlexAttention with model.use_flex (skips
the empty blocks; model/flex.py).
"""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from .chunk_attention import ChunkLocalMask, chunk_local_attend
from .config import ModelConfig
from .flex import BlockMask, flex_attend, memory_block_mask
from .memory import check_memories, encode_references, memory_pool, memory_visibility
from .rope import apply_rope, rope_for


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        # normalise in float32: squaring bf16 activations loses too many bits
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return xf.to(x.dtype) * self.weight


def repeat_kv(x: Tensor, group: int) -> Tensor:
    """(B, Hkv, S, D) -> (B, Hkv*group, S, D): query head h reads KV head h // group.

    Explicit rather than SDPA's enable_gqa, which not every fused kernel accepts with a mask.
    """
    if group == 1:
        return x
    B, H, S, D = x.shape
    return x[:, :, None].expand(B, H, group, S, D).reshape(B, H * group, S, D)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.layer = layer  # index into the KV cache
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.wqkv = nn.Linear(cfg.d_model, (cfg.n_heads + 2 * cfg.n_kv_heads) * cfg.head_dim, bias=cfg.qkv_bias)
        self.wo = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.d_model, bias=cfg.out_bias)
        # Qwen3: each head's q and k normalised before RoPE (and so before a memory's score)
        self.q_norm = RMSNorm(cfg.head_dim, cfg.norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(cfg.head_dim, cfg.norm_eps) if cfg.qk_norm else None

    def qkv(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(B, T, d_model) -> q (B, Hq, T, D), k and v (B, Hkv, T, D); no positions yet."""
        B, T, _ = x.shape
        q, k, v = self.wqkv(x).split(
            [self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim, self.n_kv_heads * self.head_dim], dim=-1
        )
        heads = lambda t: t.view(B, T, -1, self.head_dim).transpose(1, 2)  # noqa: E731
        if self.q_norm is not None:
            return self.q_norm(heads(q)), self.k_norm(heads(k)), heads(v)
        return heads(q), heads(k), heads(v)

    def kv(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """k and v of qkv without q: a memory written from a layer that no query of the
        reference reads (the last memory layer, when the score is skipped)."""
        B, T, _ = x.shape
        q_rows = self.n_heads * self.head_dim
        bias = None if self.wqkv.bias is None else self.wqkv.bias[q_rows:]
        k, v = F.linear(x, self.wqkv.weight[q_rows:], bias).split([self.n_kv_heads * self.head_dim] * 2, dim=-1)
        heads = lambda t: t.view(B, T, -1, self.head_dim).transpose(1, 2)  # noqa: E731
        return (heads(k) if self.k_norm is None else self.k_norm(heads(k))), heads(v)

    def attend(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> Tensor:
        """Output projection of softmax(q k^T / sqrt(D)) v.

        mask: broadcastable to (B, Hq, Tq, S), bool (True = may attend) or additive float;
        None means square causal (the fused causal kernels, which skip the masked half);
        a flex BlockMask routes to FlexAttention (see model/flex.py).
        """
        if isinstance(mask, BlockMask):
            y = flex_attend(q, k, v, mask)
        elif isinstance(mask, ChunkLocalMask):
            y = chunk_local_attend(q, k, v, mask)
        elif q.shape[2] == 1 and mask is not None and self.n_heads > self.n_kv_heads:
            # one query per head (decoding): the query heads of a KV head become that head's
            # query rows, so K/V are read once instead of copied group times by repeat_kv.
            # The mask never varies over heads or query rows here, so it broadcasts the same.
            B, Hq, _, D = q.shape
            if mask.dim() == 4:
                mask = mask[:, :1]
            y = F.scaled_dot_product_attention(
                q.reshape(B, self.n_kv_heads, Hq // self.n_kv_heads, D), k, v, attn_mask=mask
            ).reshape(B, Hq, 1, D)
        else:
            group = self.n_heads // self.n_kv_heads
            y = F.scaled_dot_product_attention(
                q, repeat_kv(k, group), repeat_kv(v, group), attn_mask=mask, is_causal=mask is None
            )
        B, _, T, _ = q.shape
        return self.wo(y.transpose(1, 2).reshape(B, T, -1))

    def forward(self, x, cos, sin, mask, mem_kv=None, cache=None):
        q, k, v = self.qkv(x)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:  # attend to everything cached so far plus the new tokens
            k, v = cache.update(self.layer, k, v)
        if mem_kv is not None:  # memory keys/values go before the context's
            k = torch.cat([mem_kv[0], k], dim=2)
            v = torch.cat([mem_kv[1], v], dim=2)
        return self.attend(q, k, v, mask)


class SwiGLU(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.w_gate = nn.Linear(cfg.d_model, cfg.mlp_hidden, bias=False)
        self.w_up = nn.Linear(cfg.d_model, cfg.mlp_hidden, bias=False)
        self.w_down = nn.Linear(cfg.mlp_hidden, cfg.d_model, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.w_down(F.silu(self.w_gate(x)) * self.w_up(x))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = Attention(cfg, layer)
        self.mlp_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mlp = SwiGLU(cfg)

    def forward(self, x, cos, sin, mask, mem_kv=None, cache=None):
        x = x + self.attn(self.attn_norm(x), cos, sin, mask, mem_kv, cache)
        return x + self.mlp(self.mlp_norm(x))


class Memory3(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        # memory layers through FlexAttention instead of SDPA with a dense mask: same result,
        # less work for long contexts (model/flex.py). Not part of the config: no effect on
        # the weights, the memories or the model hash.
        self.use_flex = False
        # a whole forward's memory layers chunk by chunk (model/chunk_attention.py); False: one
        # SDPA call with a dense mask over the whole pool (same result; tests compare them)
        self.chunk_local = True
        self.tok_emb = nn.Embedding(config.vocab_size, config.d_model)
        self.blocks = nn.ModuleList(Block(config, i) for i in range(config.n_layers))
        self.norm = RMSNorm(config.d_model, config.norm_eps)
        # tied: the LM head *is* the embedding matrix, so there is no second tensor to save
        self.lm_head = None if config.tie_embeddings else nn.Linear(config.d_model, config.vocab_size, bias=False)
        self.apply(self._init_weights)

    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.init_std
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=std)
        if isinstance(module, nn.Linear) and module.bias is not None:  # imported shapes only (qkv_bias)
            nn.init.zeros_(module.bias)
        # GPT-2: scale the projections that write into the residual stream by 1/sqrt(2L)
        for proj in (getattr(module, "wo", None), getattr(module, "w_down", None)):
            if isinstance(proj, nn.Linear):
                nn.init.normal_(proj.weight, mean=0.0, std=std / math.sqrt(2 * self.config.n_layers))

    def num_params(self, non_embedding: bool = True) -> int:
        """Parameter count; non_embedding leaves out the embedding and LM head matrices."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.tok_emb.weight.numel()
            if self.lm_head is not None:
                n -= self.lm_head.weight.numel()
        return n

    def positions(self, slots: Tensor, with_memory: bool) -> Tensor:
        """RoPE position of each residual-stream slot. With memory, slot 0 is the ref_bos sink
        (position 0) and context token t sits at ctx_pos_offset + t."""
        if not with_memory:
            return slots
        return torch.where(slots == 0, slots, slots + self.config.ctx_pos_offset - 1)

    def logits(self, x: Tensor) -> Tensor:
        x = self.norm(x)
        return self.lm_head(x) if self.lm_head is not None else F.linear(x, self.tok_emb.weight)

    def encode_references(self, ref_tokens: Tensor, top_k: int | None = None):
        """See model.memory.encode_references."""
        return encode_references(self, ref_tokens, top_k)

    def forward(
        self, tokens: Tensor, memories: Tensor | None = None, mem_mask: Tensor | None = None, cache=None
    ) -> Tensor:
        """Next-token logits (B, T, vocab_size) for tokens (B, T) int64.

        tokens: the context as in training, normally starting with bos_id (the BOS then
            separates the memories from the context). Right padding is harmless (causal).
        memories: None for a plain causal LM (the warmup model). Otherwise the memories of each
            chunk of mem_chunk_size tokens, shape
            (B, n_chunks, M, n_mem_layers, 2, n_kv_heads, k, head_dim), K then V, keys already
            rotated at their reference positions (what encode_references returns, stacked);
            M memories per chunk (mems_per_chunk at inference) and any k. Chunk c covers
            tokens[:, c*mem_chunk_size : (c+1)*mem_chunk_size] and attends only to
            memories[:, c]. With a cache, chunks are counted from the chunk holding the first new
            token: n_chunks must cover exactly the chunks the new tokens touch.
        mem_mask: (B, n_chunks, M, k) bool, False for empty slots (short references, missing
            memories); None = all valid.
        cache: a model.decode.KVCache to append to (incremental decoding). A cache made with
            with_memory=True reads its current memory block when memories is None, and keeps
            the last chunk's memories after a call that passes them.

        With memories (or a memory cache), ref_bos is prepended as the attention sink of every
        layer; its output row is not returned.
        """
        cfg = self.config
        if tokens.dim() != 2 or tokens.dtype != torch.long or tokens.shape[1] == 0:
            raise ValueError(f"tokens must be int64 (B, T>0), got {tokens.dtype} {tuple(tokens.shape)}")
        B, T = tokens.shape
        with_memory = cache.with_memory if cache is not None else memories is not None
        if memories is not None and not with_memory:
            raise ValueError("memories given to a cache created with with_memory=False")
        first_slot = cache.length if cache is not None else 0  # residual-stream slots so far
        ctx_start = cache.ctx_len if cache is not None else 0  # context tokens so far
        if ctx_start + T > cfg.max_seq_len:
            raise ValueError(f"context of {ctx_start + T} tokens exceeds max_seq_len={cfg.max_seq_len}")
        add_sink = with_memory and first_slot == 0

        x = self.tok_emb(tokens)
        if add_sink:
            x = torch.cat([self.tok_emb(tokens.new_full((B, 1), cfg.ref_bos_id)), x], dim=1)
        n_new = x.shape[1]
        slots = torch.arange(first_slot, first_slot + n_new, device=tokens.device)
        cos, sin = rope_for(cfg, self.positions(slots, with_memory))

        # square causal attention (is_causal) unless earlier tokens sit in the cache
        ctx_mask = (
            None
            if first_slot == 0
            else slots[:, None] >= torch.arange(first_slot + n_new, device=tokens.device)[None, :]
        )
        mem_kv, mem_layer_mask = None, None
        inline = with_memory and memories is None and cache.inline  # the cache's block, in place
        if with_memory:
            mem_kv, mem_layer_mask = self._memory_inputs(
                memories, mem_mask, cache, slots, first_slot + n_new, ctx_start, B, T, x.dtype
            )
        if cache is not None:
            cache.reading_inline = inline

        for i, block in enumerate(self.blocks):
            if with_memory and i < cfg.n_mem_layers:
                x = block(x, cos, sin, mem_layer_mask, None if inline else mem_kv[i], cache)
            else:
                x = block(x, cos, sin, ctx_mask, None, cache)

        if cache is not None:
            cache.reading_inline = False
            cache.advance(n_new)
            if memories is not None:  # decoding continues with the last chunk's memories
                cache.swap_memories(memories[:, -1], None if mem_mask is None else mem_mask[:, -1])
        return self.logits(x[:, 1:] if add_sink else x)

    def _memory_inputs(self, memories, mem_mask, cache, slots, n_keys, ctx_start, B, T, dtype):
        """Per memory layer (K, V) pools, and the one mask all memory layers share:
        (B, 1, Tq, P + n_keys) over [memory pool of P entries, context slots 0..n_keys-1]."""
        cfg = self.config
        cs = cfg.mem_chunk_size
        ctx_index = slots - 1  # position in the context; the sink is -1
        if memories is not None:
            n_chunks = (ctx_start + T - 1) // cs - ctx_start // cs + 1
            memories, mem_mask = check_memories(cfg, memories, mem_mask, B, n_chunks)
            kv, key_chunk, key_valid = memory_pool(memories.to(dtype), mem_mask)
            q_chunk = ctx_index.div(cs, rounding_mode="floor") - ctx_start // cs
        else:  # the cache's current block serves every new token (in place: kv is None)
            kv, key_valid = cache.mem_kv, cache.mem_valid
            key_chunk = torch.zeros(key_valid.shape[-1], dtype=torch.long, device=slots.device)
            q_chunk = torch.zeros_like(ctx_index)
        q_chunk = q_chunk.masked_fill(ctx_index < 0, -1)  # the sink sees no memory
        if self.use_flex and len(slots) > 1 and kv is not None and kv.shape[-2] > 0:
            return kv, memory_block_mask(q_chunk, key_chunk, key_valid, slots, n_keys)
        if memories is not None and cache is None and self.chunk_local:  # whole forward: [sink, context]
            if kv.shape[-2] == 0:  # zero memories: the plain causal kernel over [sink, context]
                return kv, None
            C = memories.shape[1]
            return kv, ChunkLocalMask(cs, kv.shape[-2] // C, key_valid.view(B, C, -1))
        causal = slots[:, None] >= torch.arange(n_keys, device=slots.device)[None, :]
        visible = memory_visibility(q_chunk, key_chunk, key_valid)
        allowed = torch.cat([visible, causal.expand(B, -1, -1)], dim=-1)[:, None]  # (B, 1, Tq, P+S)
        # additive form once here, rather than SDPA converting the bool mask in every layer
        mask = torch.zeros(allowed.shape, dtype=dtype, device=slots.device)
        return kv, mask.masked_fill_(~allowed, float("-inf"))
