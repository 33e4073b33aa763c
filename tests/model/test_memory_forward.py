"""Reading memories: forward(tokens, memories) against the loop-based reference that attends
over [ref_bos sink, own chunk's memories, causal context] with explicit positions."""

import hypothesis.strategies as st
import pytest
import torch
from hypothesis import given, settings

from model import chunk_windows, encode_references

from .helpers import make_model, random_memories, random_tokens
from .naive import NaiveModel


def chunks_of(T, cfg):
    return -(-T // cfg.mem_chunk_size)


@pytest.mark.parametrize(
    "n_heads,n_kv_heads,n_layers,n_mem_layers,T,M,k",
    [
        (4, 2, 2, 1, 16, 2, 4),  # one full chunk
        (4, 1, 2, 2, 37, 3, 2),  # three chunks, the last partial; every layer a memory layer
        (4, 4, 3, 2, 20, 1, 5),  # no GQA; a plain layer after the memory layers
        (4, 2, 2, 1, 5, 0, 4),  # an empty memory set
    ],
)
def test_memory_forward_equals_naive(n_heads, n_kv_heads, n_layers, n_mem_layers, T, M, k):
    model = make_model(n_heads=n_heads, n_kv_heads=n_kv_heads, n_layers=n_layers, n_mem_layers=n_mem_layers)
    cfg = model.config
    gen = torch.Generator().manual_seed(10)
    tokens = random_tokens(gen, cfg, 2, T)
    tokens[:, 0] = cfg.bos_id
    memories, mask = random_memories(gen, cfg, 2, chunks_of(T, cfg), M, k)
    mask[0, 0] = False  # one chunk whose memories are all empty slots
    with torch.no_grad():
        logits = model(tokens, memories, mask)
    naive = NaiveModel(model)
    for b in range(2):
        torch.testing.assert_close(
            logits[b].double(), naive.forward(tokens[b], memories[b], mask[b]), atol=1e-5, rtol=1e-5
        )


@pytest.mark.parametrize("T,lengths", [(16, [[9]]), (40, [[12, 5], [3, 16], [16, 1]])])
def test_dense_memories_end_to_end_equal_naive(T, lengths):
    """k = every reference token: encode (padded batch) + forward against naive encoding of
    each unpadded reference and naive attention over the concatenated keys."""
    model = make_model(n_heads=4, n_kv_heads=2, n_layers=3, n_mem_layers=2)
    cfg = model.config
    gen = torch.Generator().manual_seed(11)
    C, M = len(lengths), len(lengths[0])
    refs = torch.full((C * M, 16), cfg.pad_id, dtype=torch.long)
    for r, n in enumerate(sum(lengths, [])):
        refs[r, :n] = random_tokens(gen, cfg, n)
    tokens = random_tokens(gen, cfg, 1, T)
    with torch.no_grad():
        enc = encode_references(model, refs, top_k=cfg.ref_max_tokens)
        memories = enc.kv.view(1, C, M, *enc.kv.shape[1:])
        logits = model(tokens, memories, enc.mask.view(1, C, M, -1))
    naive = NaiveModel(model)
    dense = [[naive.encode(refs[c * M + m, :n], n) for m, n in enumerate(row)] for c, row in enumerate(lengths)]
    torch.testing.assert_close(logits[0].double(), naive.forward(tokens[0], dense), atol=1e-5, rtol=1e-5)


def test_one_full_reference_in_every_layer_equals_reading_it_in_context():
    """With every layer a memory layer and k = all, attending to a full-length reference's
    memory is exactly a plain causal LM over [ref_bos, reference, context] in one sequence:
    the memory keys are that sequence's keys and the context starts at ref_max_tokens + 1."""
    model = make_model(n_layers=2, n_mem_layers=2)
    cfg = model.config
    gen = torch.Generator().manual_seed(12)
    ref = random_tokens(gen, cfg, 1, cfg.ref_max_tokens)
    tokens = random_tokens(gen, cfg, 1, 40)
    with torch.no_grad():
        enc = encode_references(model, ref, top_k=cfg.ref_max_tokens)
        C = chunks_of(40, cfg)  # every chunk retrieves the same reference
        memories = enc.kv[:, None, None].expand(1, C, 1, *enc.kv.shape[1:])
        with_memory = model(tokens, memories)
        in_context = model(torch.cat([torch.tensor([[cfg.ref_bos_id]]), ref, tokens], 1))
    torch.testing.assert_close(with_memory, in_context[:, 1 + cfg.ref_max_tokens :], atol=1e-5, rtol=1e-5)


def test_empty_memory_sets_agree():
    """No memory (M = 0) and memories whose slots are all masked give the same logits."""
    model = make_model()
    cfg = model.config
    gen = torch.Generator().manual_seed(13)
    tokens = random_tokens(gen, cfg, 2, 30)
    memories, _ = random_memories(gen, cfg, 2, 2, 3, 4)
    with torch.no_grad():
        masked = model(tokens, memories, torch.zeros(2, 2, 3, 4, dtype=torch.bool))
        empty = model(tokens, memories[:, :, :0])
    torch.testing.assert_close(masked, empty, atol=1e-5, rtol=1e-5)


def test_without_memories_it_is_the_plain_causal_lm():
    model = make_model()
    gen = torch.Generator().manual_seed(14)
    tokens = random_tokens(gen, model.config, 2, 25)
    with torch.no_grad():
        torch.testing.assert_close(
            model(tokens, None).double()[1], NaiveModel(model).forward(tokens[1]), atol=1e-5, rtol=1e-5
        )


@settings(max_examples=20, deadline=None)
@given(T=st.integers(1, 60), victim=st.integers(0, 3), seed=st.integers(0, 2**16))
def test_a_chunk_never_sees_another_chunks_memories(T, victim, seed):
    """Perturb one chunk's memories: in a one-layer model only that chunk's outputs move; in a
    deeper model the chunks before it stay put (later ones may read it through the context)."""
    gen = torch.Generator().manual_seed(seed)
    for n_layers in (1, 2):
        model = make_model(seed=seed % 7, n_layers=n_layers, n_mem_layers=1)
        cfg = model.config
        C = chunks_of(T, cfg)
        victim_chunk = victim % C
        tokens = random_tokens(gen, cfg, 2, T)
        memories, mask = random_memories(gen, cfg, 2, C, 2, 3, p_valid=1.0)
        perturbed = memories.clone()
        perturbed[:, victim_chunk] += 3 * torch.randn(perturbed[:, victim_chunk].shape, generator=gen)
        with torch.no_grad():
            a, b = model(tokens, memories, mask), model(tokens, perturbed, mask)
        chunk = torch.arange(T) // cfg.mem_chunk_size
        same = chunk != victim_chunk if n_layers == 1 else chunk < victim_chunk
        torch.testing.assert_close(a[:, same], b[:, same], atol=1e-6, rtol=1e-6)
        assert (a[:, chunk == victim_chunk] - b[:, chunk == victim_chunk]).abs().max() > 1e-3


def test_each_batch_row_reads_its_own_memories():
    model = make_model()
    cfg = model.config
    gen = torch.Generator().manual_seed(15)
    tokens = random_tokens(gen, cfg, 2, 20)
    memories, mask = random_memories(gen, cfg, 2, 2, 2, 3)
    with torch.no_grad():
        both = model(tokens, memories, mask)
        second = model(tokens[1:], memories[1:], mask[1:])
    torch.testing.assert_close(both[1:], second, atol=1e-5, rtol=1e-5)


def test_memories_in_another_dtype_are_cast():
    model = make_model()
    gen = torch.Generator().manual_seed(16)
    tokens = random_tokens(gen, model.config, 1, 10)
    memories, mask = random_memories(gen, model.config, 1, 1, 2, 3)
    with torch.no_grad():
        torch.testing.assert_close(model(tokens, memories.double(), mask), model(tokens, memories, mask))


def test_mismatched_memory_shapes_raise_clear_errors():
    model = make_model()
    cfg = model.config
    gen = torch.Generator().manual_seed(17)
    tokens = random_tokens(gen, cfg, 2, 20)  # two chunks of 16
    memories, mask = random_memories(gen, cfg, 2, 2, 3, 4)
    cases = [
        (memories[:, :1], mask[:, :1], "n_chunks=2"),
        (memories[:1], mask[:1], "B=2"),
        (memories[:, :, :, :, :, :1], mask, "memories must have shape"),
        (memories[..., :4], mask, "memories must have shape"),
        (memories[0], mask, "memories must have shape"),
        (memories, mask[..., :3], "mem_mask must be bool"),
        (memories, mask.float(), "mem_mask must be bool"),
    ]
    for mem, msk, message in cases:
        with pytest.raises(ValueError, match=message):
            model(tokens, mem, msk)


def test_continual_training_step_backpropagates_through_reference_encoding():
    """The paper's training layout: each chunk retrieves one reference, encoded in the same
    step with the current weights, and reads its own and the previous chunks' references."""
    model = make_model(n_layers=3, n_mem_layers=2).train()
    cfg = model.config
    gen = torch.Generator().manual_seed(18)
    tokens = random_tokens(gen, cfg, 2, 40)
    C = chunks_of(40, cfg)
    refs = random_tokens(gen, cfg, 2 * C, 12)
    enc = encode_references(model, refs)
    kv = enc.kv.view(2, C, *enc.kv.shape[1:])
    memories, mask = chunk_windows(kv, enc.mask.view(2, C, -1), window=cfg.mems_per_chunk)
    logits = model(tokens[:, :-1], memories, mask)
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())
    loss.backward()
    assert torch.isfinite(loss)
    # wqkv of layer 0 gets gradient from the context and from the memories it wrote
    context_only = make_model(n_layers=3, n_mem_layers=2).train()
    logits = context_only(tokens[:, :-1], memories.detach(), mask)
    torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten()).backward()
    assert not torch.allclose(model.blocks[0].attn.wqkv.weight.grad, context_only.blocks[0].attn.wqkv.weight.grad)
    assert all(p.grad is not None for p in model.parameters())


def test_zero_memories_keep_the_sink_and_positions_of_a_memory_forward():
    """The no-memory baseline of a model trained with memory: zero memories, sink kept. It equals
    a forward whose memory slots are all masked, and differs from the plain forward (which drops
    the sink and shifts the context to position 0): the baseline must not be the latter."""
    from model.memory import no_memories

    model = make_model()
    cfg = model.config
    gen = torch.Generator().manual_seed(3)
    tokens = random_tokens(gen, cfg, 2, 2 * cfg.mem_chunk_size + 5)
    C = 3
    zero = model(tokens, *no_memories(cfg, 2, C))
    mem, _ = random_memories(gen, cfg, 2, C, 2, cfg.mem_top_k)
    masked = model(tokens, mem, torch.zeros(2, C, 2, cfg.mem_top_k, dtype=torch.bool))
    torch.testing.assert_close(zero, masked)
    assert (zero - model(tokens)).abs().max() > 1e-3


@pytest.mark.parametrize("T, M, k", [(3 * 16, 2, 4), (2 * 16 + 5, 3, 7), (9, 1, 4)])
def test_chunk_local_attention_equals_the_dense_mask(T, M, k):
    """Each chunk's queries against their own memories (the default) give the dense mask's
    result, forward and gradients; short last chunks and empty slots included."""
    model = make_model().train()
    cfg = model.config
    gen = torch.Generator().manual_seed(T + M + k)
    tokens = random_tokens(gen, cfg, 2, T)
    C = -(-T // cfg.mem_chunk_size)
    mem, mask = random_memories(gen, cfg, 2, C, M, k)
    mem.requires_grad_(True)
    out = {}
    for local in (True, False):
        model.chunk_local = local
        model.zero_grad()
        mem.grad = None
        logits = model(tokens, mem, mask)
        (logits.float() ** 2).mean().backward()
        out[local] = (logits.detach(), mem.grad.clone(), model.blocks[0].attn.wqkv.weight.grad.clone())
    for a, b in zip(out[True], out[False]):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-4)
