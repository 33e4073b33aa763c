"""Incremental decoding with the KV cache equals the full forward, with and without memory
swaps; generate() follows the paper's retrieval schedule."""

import hypothesis.strategies as st
import pytest
import torch
from hypothesis import given, settings

from model import KVCache, generate

from .helpers import make_model, random_memories, random_tokens


def decode_in_pieces(model, tokens, cuts, memories=None, mask=None, swap_at=()):
    """Feed tokens through a cache in pieces ending at `cuts`; at each context length in
    swap_at, swap in that chunk's memories. The first piece passes the memories of the chunks
    it covers (prefill). Returns the concatenated logits."""
    cfg = model.config
    cs = cfg.mem_chunk_size
    cache = KVCache(model, tokens.shape[0], tokens.shape[1], with_memory=memories is not None)
    out, start = [], 0
    for end in cuts:
        if start in swap_at:
            c = start // cs
            cache.swap_memories(memories[:, c], mask[:, c])
        kwargs = {}
        if start == 0 and memories is not None:
            first, last = 0, (end - 1) // cs
            kwargs = dict(memories=memories[:, first : last + 1], mem_mask=mask[:, first : last + 1])
        out.append(model(tokens[:, start:end], cache=cache, **kwargs))
        start = end
    return torch.cat(out, dim=1)


@pytest.mark.parametrize("with_memory", [False, True])
def test_token_by_token_decoding_equals_full_forward(with_memory):
    model = make_model()
    cfg = model.config
    gen = torch.Generator().manual_seed(20)
    T, T0 = 50, 7
    tokens = random_tokens(gen, cfg, 2, T)
    memories = mask = None
    if with_memory:  # no swaps: every chunk reads the prompt chunk's memories
        memories, mask = random_memories(gen, cfg, 2, 1, 2, 3)
        memories, mask = memories.expand(-1, 4, -1, -1, -1, -1, -1, -1), mask.expand(-1, 4, -1, -1)
    with torch.no_grad():
        full = model(tokens, memories, mask)
        steps = decode_in_pieces(model, tokens, [T0, *range(T0 + 1, T + 1)], memories, mask)
    torch.testing.assert_close(steps, full, atol=1e-5, rtol=1e-5)


@settings(max_examples=20, deadline=None)
@given(T=st.integers(2, 60), n_cuts=st.integers(1, 6), seed=st.integers(0, 2**16))
def test_decoding_with_memory_swaps_equals_full_forward(T, n_cuts, seed):
    """Pieces of any size; a swap at every chunk boundary that a piece starts on. Pieces that
    cross a boundary without a swap keep the block they started with, so the full forward is
    given that block for the chunks they cover."""
    model = make_model()
    cfg = model.config
    cs = cfg.mem_chunk_size
    gen = torch.Generator().manual_seed(seed)
    cuts = sorted(set(torch.randint(1, T, (n_cuts,), generator=gen).tolist()) | {T})
    tokens = random_tokens(gen, cfg, 2, T)
    C = -(-T // cs)
    memories, mask = random_memories(gen, cfg, 2, C, 2, 3)
    starts = [0] + cuts[:-1]
    swap_at = [s for s in starts[1:] if s % cs == 0]
    # the block each token reads, as the cache sees it; swaps fall on chunk boundaries only,
    # so it is constant within a chunk
    block_of_token, active = [], None
    for start, end in zip(starts, cuts):
        if start in swap_at:
            active = start // cs
        block_of_token += [t // cs if start == 0 else active for t in range(start, end)]
        if start == 0:
            active = (end - 1) // cs
    block_of_chunk = [block_of_token[c * cs] for c in range(C)]
    with torch.no_grad():
        full = model(tokens, memories[:, block_of_chunk], mask[:, block_of_chunk])
        pieces = decode_in_pieces(model, tokens, cuts, memories, mask, swap_at)
    torch.testing.assert_close(pieces, full, atol=1e-5, rtol=1e-5)


def test_generate_follows_the_paper_schedule():
    """Greedy generation with retrieval equals recomputing the full forward at every step with
    the paper's per-chunk memories: prompt chunks retrieve their own; the first generated
    chunk inherits the last prompt chunk's; each later one retrieves with the chunk before."""
    model = make_model()
    cfg = model.config
    cs = cfg.mem_chunk_size
    gen = torch.Generator().manual_seed(21)

    def retrieve(chunk_tokens):  # deterministic in the query tokens
        g = torch.Generator().manual_seed(int(chunk_tokens.sum()) % 10_000)
        memories, mask = random_memories(g, cfg, chunk_tokens.shape[0], 1, 2, 3)
        return memories[:, 0], mask[:, 0]

    prompt = random_tokens(gen, cfg, 2, 2 * cs)
    n_new = 2 * cs + 5
    with torch.no_grad():
        out = generate(model, prompt, n_new, retrieve=retrieve)
        seq = prompt
        for _ in range(n_new):
            n_chunks = -(-seq.shape[1] // cs)
            queries = [seq[:, c * cs : (c + 1) * cs] for c in range(2)] + [prompt[:, cs:]]
            queries += [seq[:, c * cs : (c + 1) * cs] for c in range(2, n_chunks - 1)]
            blocks = [retrieve(q) for q in queries[:n_chunks]]
            memories = torch.stack([m for m, _ in blocks], 1)
            mask = torch.stack([m for _, m in blocks], 1)
            nxt = model(seq, memories, mask)[:, -1].argmax(-1, keepdim=True)
            seq = torch.cat([seq, nxt], 1)
    assert torch.equal(out, seq)


def test_generate_without_retrieval_is_greedy_decoding():
    model = make_model()
    gen = torch.Generator().manual_seed(22)
    prompt = random_tokens(gen, model.config, 1, 5)
    with torch.no_grad():
        out = generate(model, prompt, 6)
        seq = prompt
        for _ in range(6):
            seq = torch.cat([seq, model(seq)[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(out, seq)


def test_cache_misuse_raises_clear_errors():
    model = make_model()
    cfg = model.config
    gen = torch.Generator().manual_seed(23)
    tokens = random_tokens(gen, cfg, 1, 6)
    memories, mask = random_memories(gen, cfg, 1, 1, 2, 3)
    plain = KVCache(model, 1, 8, with_memory=False)
    with pytest.raises(ValueError, match="with_memory=False"):
        model(tokens, memories, mask, cache=plain)
    with pytest.raises(ValueError, match="with_memory=False"):
        plain.swap_memories(memories[:, 0], mask[:, 0])
    with torch.no_grad():
        model(tokens, cache=plain)
        with pytest.raises(ValueError, match="cache full"):
            model(tokens, cache=plain)
    cache = KVCache(model, 1, 8, with_memory=True)
    with pytest.raises(ValueError, match="do not fit"):
        cache.swap_memories(memories[:, 0, :, :, :, :1], mask[:, 0])
    with pytest.raises(ValueError, match="mem_mask"):
        cache.swap_memories(memories[:, 0], mask[:, 0, :, :2])


def test_a_block_that_fits_the_memory_region_after_one_that_did_not():
    """A block too large for the cache's front region is read beside it; the next block that
    fits goes back in place, with the region's slot mask (before: the large block's wider mask,
    and the next decode step failed on the width). The small block padded with invalid entries
    to the large shape is the same memories, so the full forward is the reference."""
    model = make_model()
    cfg = model.config
    cs = cfg.mem_chunk_size
    gen = torch.Generator().manual_seed(24)
    T = 2 * cs + 5
    tokens = random_tokens(gen, cfg, 2, T)
    big, big_mask = random_memories(gen, cfg, 2, 2, 3, 4)  # 12 entries > mems_per_chunk * mem_top_k
    small, small_mask = random_memories(gen, cfg, 2, 1, 2, 3)
    padded = torch.zeros(2, 1, 3, *big.shape[3:])
    padded[:, :, :2, ..., :3, :] = small
    padded_mask = torch.zeros(2, 1, 3, 4, dtype=torch.bool)
    padded_mask[:, :, :2, :3] = small_mask
    cache = KVCache(model, 2, T, with_memory=True)
    with torch.no_grad():
        full = model(tokens, torch.cat([big, padded], 1), torch.cat([big_mask, padded_mask], 1))
        steps = [model(tokens[:, :cs], big[:, :1], big_mask[:, :1], cache=cache)]
        cache.swap_memories(big[:, 1], big_mask[:, 1])
        steps += [model(tokens[:, t : t + 1], cache=cache) for t in range(cs, 2 * cs)]
        cache.swap_memories(small[:, 0], small_mask[:, 0])
        assert cache.inline
        steps += [model(tokens[:, t : t + 1], cache=cache) for t in range(2 * cs, T)]
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=1e-5)
