"""A decode step of fixed shapes over a preallocated KV cache, so that a GPU can replay it as one
CUDA graph.

Why: Memory3.forward on a KVCache slices the cache to the tokens written so far, so every step
has new shapes and launches a few hundred small kernels one by one from Python. For the 2.4B
shape on an H200 that bound decoding by launch overhead: 738 tok/s at batch 32, against 4,546
tok/s for a captured step of the same shape (BENCHMARKS.md). Here every step has the same shapes
and reads the same buffers:
- each layer attends over the cache's whole width and masks the slots not written yet (the
  same rule as the sliced read; the masked keys add exact zeros to the softmax);
- the token and its slot come from device tensors refilled before each step, so nothing that
  changes between steps is a Python value baked into the graph;
- a memory swap refills the cache's front region and its slot mask in place
  (KVCache.swap_memories), outside the graph: the graph reads whatever block is there.
On CUDA the step is captured once (torch.cuda.CUDAGraph) and replayed; elsewhere the same step
runs eagerly (the tests compare it with Memory3.forward on a KVCache).

Prefill stays with Memory3.forward on the same cache (one call, variable length, not worth a
graph). The logits agree with the eager path's to rounding, not bit for bit: the attention
kernels sum over more (masked) keys.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .decode import KVCache
from .rope import apply_rope, rope_for


class StaticDecoder:
    """One KV cache and one step function for batches of `batch_size` rows of up to `max_len`
    context tokens; reusable across batches (reset). `graph`: capture the step as a CUDA graph
    (default: on a CUDA device)."""

    def __init__(self, model, batch_size: int, max_len: int, *, with_memory: bool, graph: bool | None = None):
        self.model = model
        self.cache = KVCache(model, batch_size, max_len, with_memory=with_memory)
        device = self.cache.k.device
        self.graph = device.type == "cuda" if graph is None else graph
        if self.graph and device.type != "cuda":
            raise ValueError(f"CUDA graphs need a CUDA device, the cache is on {device}")
        self.batch_size, self.max_len = batch_size, max_len
        self.token = torch.zeros(batch_size, 1, dtype=torch.long, device=device)
        self.slot = torch.zeros(1, dtype=torch.long, device=device)  # residual-stream slot
        self._ctx_slots = torch.arange(self.cache.k.shape[3] - self.cache.mem_slots, device=device)
        self._graph: torch.cuda.CUDAGraph | None = None
        self._logits: Tensor | None = None  # the captured step's output buffer

    def reset(self) -> KVCache:
        """The cache, emptied for a new batch; a captured graph stays valid (same buffers)."""
        self.cache.reset()
        return self.cache

    @torch.no_grad()
    def __call__(self, token: Tensor) -> Tensor:
        """Feed one token per row (B, 1) after the cache's contents; logits (B, 1, vocab).
        With a graph the logits are its output buffer: read them before the next step."""
        c = self.cache
        if c.length == 0:
            raise ValueError("prefill the cache with the model first (it adds the sink and the prompt)")
        if c.length + 1 > self._ctx_slots.numel():
            raise ValueError(f"KV cache full: {self._ctx_slots.numel()} slots allocated")
        if c.ctx_len + 1 > self.model.config.max_seq_len:
            raise ValueError(f"context of {c.ctx_len + 1} tokens exceeds max_seq_len")
        if c.with_memory and not c.inline:
            raise ValueError(
                "a memory block larger than mems_per_chunk x mem_top_k does not fit "
                "the cache's memory region; decode it with the model instead"
            )
        self.token.copy_(token)
        self.slot.fill_(c.length)
        if not self.graph:
            logits = self._step()
        else:
            if self._graph is None:
                self._capture()
            self._graph.replay()
            logits = self._logits
        c.advance(1)
        return logits

    def _capture(self) -> None:
        # warm-up on a side stream first (library handles, autotuning), as torch.cuda.graphs
        # asks; the warm-up writes this step's own K/V slot, which the replay rewrites
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                self._step()
        torch.cuda.current_stream().wait_stream(side)
        self._graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self._graph):
            self._logits = self._step()

    def _step(self) -> Tensor:
        """Memory3.forward for one token on the cache, written with fixed shapes."""
        model, c = self.model, self.cache
        cfg = model.config
        x = model.tok_emb(self.token)
        cos, sin = rope_for(cfg, model.positions(self.slot, c.with_memory))
        seen = (self._ctx_slots <= self.slot)[None, None, None, :]  # (1, 1, 1, S): slots written
        mem_mask = None
        if c.with_memory:  # [front region's valid slots | context], additive as the eager path's
            allowed = torch.cat([c.slot_valid, seen[0, 0].expand(c.slot_valid.shape[0], -1)], dim=1)
            mem_mask = torch.zeros(allowed.shape, dtype=x.dtype, device=x.device)
            mem_mask = mem_mask.masked_fill_(~allowed, float("-inf"))[:, None, None, :]
        at = self.slot + c.mem_slots  # this token's slot in the buffers
        for i, block in enumerate(model.blocks):
            attn = block.attn
            q, k, v = attn.qkv(block.attn_norm(x))
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
            c.k[i].index_copy_(2, at, k)
            c.v[i].index_copy_(2, at, v)
            reads_memory = c.with_memory and i < cfg.n_mem_layers
            first = 0 if reads_memory else c.mem_slots
            x = x + attn.attend(q, c.k[i, :, :, first:], c.v[i, :, :, first:], mem_mask if reads_memory else seen)
            x = x + block.mlp(block.mlp_norm(x))
        return model.logits(x)
