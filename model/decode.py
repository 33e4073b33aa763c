"""Incremental decoding: a preallocated KV cache whose memory block can be swapped, and generate().

The context keys and values of every layer are cached once and never recomputed. The memory
block (what the memory layers read besides the context) can be replaced at any time: tokens
computed before a swap keep what they saw, exactly as in a full forward where each chunk
attends to its own memories. Use under torch.no_grad().

Layout: each layer's buffer is [memory block | sink | context]. A swapped-in block of up to
mems_per_chunk * mem_top_k entries is written into the front region, so a decode step's memory
layers attend to one contiguous slice instead of concatenating the block with the whole cache
at every step (a copy of the cache per memory layer per token). A larger block falls back to
the concatenation.
"""

from typing import Callable

import torch
from torch import Tensor

from .memory import memory_pool

# retrieve(chunk_tokens (B, n)) -> (memories (B, M, n_mem_layers, 2, n_kv_heads, k, head_dim),
#                                   mask (B, M, k) bool or None)
Retriever = Callable[[Tensor], tuple[Tensor, Tensor | None]]


class KVCache:
    def __init__(self, model, batch_size: int, max_len: int, *, with_memory: bool, device=None, dtype=None):
        """Room for max_len context tokens (plus the ref_bos sink when with_memory)."""
        cfg = model.config
        p = next(model.parameters())
        device, dtype = device or p.device, dtype or p.dtype
        self.with_memory = with_memory
        self.n_mem_layers = cfg.n_mem_layers
        # the front region that holds the memory block in place (see the module docstring)
        self.mem_slots = cfg.mems_per_chunk * cfg.mem_top_k if with_memory else 0
        slots = max_len + int(with_memory)
        shape = (cfg.n_layers, batch_size, cfg.n_kv_heads, self.mem_slots + slots, cfg.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.length = 0  # slots filled, the sink included
        # the current memory block: in place (front region, all slots invalid until a swap), or
        # mem_kv (n_mem_layers, 2, B, n_kv_heads, P, head_dim) for a block too large for it
        self.inline = True
        self.mem_kv = None
        # which front-region slots hold a token: refilled in place by every in-place swap, never
        # reallocated, so a captured decode step (model/static_decode.py) keeps reading it
        self.slot_valid = torch.zeros(batch_size, self.mem_slots, dtype=torch.bool, device=device)
        self.mem_valid = self.slot_valid  # the current block's: slot_valid, or the large block's
        # set by the model for one forward: memory layers read the front region with the context
        self.reading_inline = False

    def reset(self) -> None:
        """Empty, for a new batch of the same shape: the buffers stay where they are (a captured
        decode step keeps reading them); stale slots are never read, as every read is masked or
        sliced to the slots written since."""
        self.length = 0
        self.inline, self.mem_kv = True, None
        self.slot_valid.zero_()
        self.mem_valid = self.slot_valid

    @property
    def ctx_len(self) -> int:
        """Context tokens cached (the sink not counted)."""
        return max(self.length - int(self.with_memory), 0)

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Store the new tokens' K/V (B, Hkv, n, D) of one layer; return all cached so far
        (preceded by the memory block when a memory layer reads it in place)."""
        start, end = self.mem_slots + self.length, self.mem_slots + self.length + k.shape[2]
        if end > self.k.shape[3]:
            raise ValueError(
                f"KV cache full: {end - self.mem_slots} slots needed, {self.k.shape[3] - self.mem_slots} allocated"
            )
        self.k[layer, :, :, start:end] = k
        self.v[layer, :, :, start:end] = v
        first = 0 if self.reading_inline and layer < self.n_mem_layers else self.mem_slots
        return self.k[layer, :, :, first:end], self.v[layer, :, :, first:end]

    def advance(self, n: int) -> None:
        """Called by the model once every layer has stored its n new slots."""
        self.length += n

    def swap_memories(self, memories: Tensor, mem_mask: Tensor | None = None) -> None:
        """Replace the memory block read by the tokens that come next.

        memories (B, M, n_mem_layers, 2, n_kv_heads, k, head_dim); mem_mask (B, M, k) bool.
        """
        if not self.with_memory:
            raise ValueError("swap_memories on a cache created with with_memory=False")
        B, M, L, two, H, k, D = memories.shape
        if (B, L, two, H, D) != (self.k.shape[1], self.n_mem_layers, 2, self.k.shape[2], self.k.shape[4]):
            raise ValueError(f"memories of shape {tuple(memories.shape)} do not fit this cache")
        if mem_mask is None:
            mem_mask = torch.ones(B, M, k, dtype=torch.bool, device=memories.device)
        if tuple(mem_mask.shape) != (B, M, k) or mem_mask.dtype != torch.bool:
            raise ValueError(f"mem_mask must be bool {(B, M, k)}, got {tuple(mem_mask.shape)}")
        kv, _, valid = memory_pool(memories[:, None].to(self.k.dtype), mem_mask[:, None])
        P = kv.shape[-2]
        self.inline = P <= self.mem_slots
        if self.inline:
            self.k[:L, :, :, :P] = kv[:, 0]
            self.v[:L, :, :, :P] = kv[:, 1]
            # the slot mask, not the last block's: after a block too large for the front region
            # mem_valid is that block's (wider) mask
            self.slot_valid.zero_()
            self.slot_valid[:, :P] = valid
            self.mem_valid = self.slot_valid
            self.mem_kv = None
        else:
            self.mem_kv, self.mem_valid = kv, valid


def _mask_or_all(memories: Tensor, mask: Tensor | None) -> Tensor:
    """A retrieved block's (B, M, k) mask, all valid when the retriever gave none."""
    if mask is not None:
        return mask
    B, M, *_, k, _ = memories.shape
    return torch.ones(B, M, k, dtype=torch.bool, device=memories.device)


def _sample(logits: Tensor, temperature: float, generator) -> Tensor:
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    return torch.multinomial(probs, 1, generator=generator)


@torch.no_grad()
def generate(
    model,
    prompt: Tensor,
    max_new_tokens: int,
    retrieve: Retriever | None = None,
    temperature: float = 0.0,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Continue prompt (B, T0) by max_new_tokens; returns (B, T0 + max_new_tokens).

    With retrieve, follows the paper's schedule [§3.1]: each mem_chunk_size-token chunk of the
    prompt retrieves its own memories; the first generated chunk inherits the last prompt
    chunk's memories; then every mem_chunk_size generated tokens are the query of a new
    retrieval that replaces the memory block, the context cache untouched.
    """
    cs = model.config.mem_chunk_size
    B, T0 = prompt.shape
    cache = KVCache(model, B, T0 + max_new_tokens, with_memory=retrieve is not None)
    memories = mem_mask = None
    if retrieve is not None:  # one retrieval per prompt chunk (retrieval, not attention, loops)
        blocks = [retrieve(prompt[:, c : c + cs]) for c in range(0, T0, cs)]
        memories = torch.stack([m for m, _ in blocks], dim=1)
        mem_mask = torch.stack([_mask_or_all(m, mask) for m, mask in blocks], dim=1)
    logits = model(prompt, memories, mem_mask, cache=cache)
    out = [prompt]
    for step in range(max_new_tokens):
        token = _sample(logits[:, -1], temperature, generator)
        out.append(token)
        if step == max_new_tokens - 1:
            break
        if retrieve is not None and step > 0 and step % cs == 0:
            # `token` opens a new chunk: the cs generated tokens before it are the query
            cache.swap_memories(*retrieve(torch.cat(out[-cs - 1 : -1], dim=1)))
        logits = model(token, cache=cache)
    return torch.cat(out, dim=1)
