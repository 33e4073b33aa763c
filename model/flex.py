"""Optional FlexAttention path for the memory layers (model.use_flex = True; meant for CUDA).

Why: SDPA takes the memory layers' rule as a dense (Tq, P + S) mask, and masked kernels visit
every block of it. A memory layer then pays for the whole context square plus every chunk's
memories for every query: at T = 2048 with 32 chunks x 5 memories x 8 tokens that is ~3x the
causal triangle that the plain layers pay. FlexAttention skips the blocks the mask empties, so
a memory layer costs about the causal triangle plus each chunk's own memories. Same rule, same
result as the dense mask (tests compare them); only the work differs.
"""

import torch
from torch import Tensor
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention

COMPILE = True  # without torch.compile flex_attention materialises the scores (tests only)
_compiled = None


def memory_block_mask(q_chunk: Tensor, key_chunk: Tensor, key_valid: Tensor, q_slot: Tensor, n_keys: int) -> BlockMask:
    """The memory layers' mask over [memory pool (P entries), context slots 0..n_keys-1]:
    a query sees pool entries of its own chunk that hold a token, and context slots up to its
    own (q_chunk is -1 for the sink, which sees no memory)."""
    n_pool = key_chunk.shape[0]
    assert n_pool > 0, "an empty pool needs no block mask"

    def mask_mod(b, h, q, kv):
        in_pool = kv < n_pool
        p = kv.clamp(max=n_pool - 1)  # every branch is evaluated: keep the index in range
        sees_memory = (key_chunk[p] == q_chunk[q]) & key_valid[b, p]
        sees_context = kv - n_pool <= q_slot[q]
        return torch.where(in_pool, sees_memory, sees_context)

    return create_block_mask(
        mask_mod, key_valid.shape[0], None, q_chunk.shape[0], n_pool + n_keys, device=q_chunk.device
    )


def flex_attend(q: Tensor, k: Tensor, v: Tensor, block_mask: BlockMask) -> Tensor:
    """Attention over grouped KV heads (q (B, Hq, T, D), k and v (B, Hkv, S, D))."""
    global _compiled
    fn = flex_attention
    if COMPILE:
        # static shapes: one kernel per (T, keys) shape. The dynamic-shape recompile that
        # torch.compile tries on the second shape fails in the CPU backend (torch 2.13)
        _compiled = _compiled or torch.compile(flex_attention, dynamic=False)
        fn = _compiled
    return fn(q, k, v, block_mask=block_mask, enable_gqa=q.shape[1] != k.shape[1])
