"""model.train_step: the LM loss and the continual-train memories (real tiny model, no mocks)."""

import torch
import torch.nn.functional as F

from model.memory import chunk_windows, encode_references
from model.train_step import continual_memories, lm_loss

from .helpers import make_model, random_tokens


def _batch(model, B=2, C=3, T_ref=10, seed=0):
    cfg = model.config
    gen = torch.Generator().manual_seed(seed)
    tokens = random_tokens(gen, cfg, B, C * cfg.mem_chunk_size)
    refs = random_tokens(gen, cfg, B, C, T_ref)
    refs[0, 1, 7:] = cfg.pad_id  # one short reference
    valid = torch.ones(B, C, dtype=torch.bool)
    return tokens, refs, valid


def test_lm_loss_is_next_token_cross_entropy_ignoring_pad():
    model = make_model()
    cfg = model.config
    tokens, _, _ = _batch(model)
    tokens[1, -5:] = cfg.pad_id
    logits = model(tokens)
    keep = tokens[:, 1:] != cfg.pad_id
    want = F.cross_entropy(logits[:, :-1][keep], tokens[:, 1:][keep])
    torch.testing.assert_close(lm_loss(model, tokens), want)


def test_loss_with_own_reference_equals_the_forward_with_that_memory():
    model = make_model()
    tokens, refs, valid = _batch(model)
    B, C, T = refs.shape
    mem, mask = continual_memories(model, refs, valid, window=1, sparsify=False)
    # by hand: each chunk's own reference, dense, as its only memory
    enc = encode_references(model, refs.reshape(B * C, T), top_k=T)
    kv = enc.kv.reshape(B, C, 1, *enc.kv.shape[1:])
    want = lm_loss(model, tokens, kv, enc.mask.reshape(B, C, 1, T))
    torch.testing.assert_close(lm_loss(model, tokens, mem, mask), want)
    assert mem.shape[2] == 1 and mask.shape == (B, C, 1, T)


def test_window_layout_and_sparsify():
    model = make_model()
    cfg = model.config
    tokens, refs, valid = _batch(model)
    B, C, T = refs.shape
    mem, mask = continual_memories(model, refs, valid, window=5, sparsify=True)
    assert mem.shape == (B, C, 5, cfg.n_mem_layers, 2, cfg.n_kv_heads, cfg.mem_top_k, cfg.head_dim)
    enc = encode_references(model, refs.reshape(B * C, T))  # model's top-k
    want_kv, want_mask = chunk_windows(enc.kv.reshape(B, C, *enc.kv.shape[1:]), enc.mask.reshape(B, C, -1), 5)
    torch.testing.assert_close(mem, want_kv)
    assert torch.equal(mask, want_mask)
    assert not mask[:, 0, :4].any()  # chunk 0 has no predecessors


def test_missing_neighbors_are_masked_and_cannot_leak():
    model = make_model()
    tokens, refs, valid = _batch(model)
    valid[0, 1] = False
    valid[1, 0] = False
    mem, mask = continual_memories(model, refs, valid, window=3)
    # the window slot that holds chunk (0, 1) is empty wherever it appears
    assert not mask[0, 1, -1].any() and not mask[0, 2, -2].any() and not mask[1, 0, -1].any()
    other = refs.clone()
    other[0, 1] = torch.flip(other[0, 1], [0]) + 1  # any content: it is masked
    other[1, 0] = 5
    mem2, mask2 = continual_memories(model, other, valid, window=3)
    assert torch.equal(mask, mask2)
    torch.testing.assert_close(lm_loss(model, tokens, mem, mask), lm_loss(model, tokens, mem2, mask2))


def test_gradients_flow_through_refs_only_when_configured():
    model = make_model().train()
    tokens, refs, valid = _batch(model)
    grads = {}
    for through in (True, False):
        model.zero_grad()
        mem, mask = continual_memories(model, refs, valid, window=5, grad_through_refs=through)
        assert mem.requires_grad is through
        lm_loss(model, tokens, mem, mask).backward()
        grads[through] = model.blocks[0].attn.wqkv.weight.grad.clone()
    assert grads[False].abs().sum() > 0
    assert not torch.allclose(grads[True], grads[False])


def _served_batch(model, B=2, C=3, M=2, T_ref=10, seed=1):
    cfg = model.config
    gen = torch.Generator().manual_seed(seed)
    tokens = random_tokens(gen, cfg, B, C * cfg.mem_chunk_size)
    refs = random_tokens(gen, cfg, B, C, M, T_ref)
    valid = torch.ones(B, C, M, dtype=torch.bool)
    valid[1, 0, 1] = False
    return tokens, refs, valid


def test_serving_schedule_chunk_c_reads_what_chunk_c_minus_1_retrieved():
    model = make_model()
    tokens, refs, valid = _served_batch(model)
    B, C, M, T = refs.shape
    mem, mask = continual_memories(model, refs, valid, schedule="serving", sparsify=False)
    assert mem.shape[:3] == (B, C, M) and mask.shape == (B, C, M, T)
    assert not mask[:, 0].any()  # chunk 0: no earlier text retrieved for it
    for c in range(1, C):
        enc = encode_references(
            model, torch.where(valid[:, c - 1, :, None], refs[:, c - 1], 0).reshape(B * M, T), top_k=T
        )
        torch.testing.assert_close(mem[:, c], enc.kv.reshape(B, M, *enc.kv.shape[1:]))
        assert torch.equal(mask[:, c], enc.mask.reshape(B, M, T) & valid[:, c - 1, :, None])
    # what the last chunk retrieved is read by no chunk: changing it changes nothing
    other = refs.clone()
    other[:, -1] = 7
    mem2, _ = continual_memories(model, other, valid, schedule="serving", sparsify=False)
    torch.testing.assert_close(mem, mem2)
    # a scored token of chunk c never reads a memory retrieved with its own chunk: changing
    # chunk 1's retrieval leaves the loss of chunks 0 and 1 as it was
    other = refs.clone()
    other[:, 1] = torch.flip(other[:, 1], [-1])
    mem3, mask3 = continual_memories(model, other, valid, schedule="serving", sparsify=False)
    cs = model.config.mem_chunk_size
    a, b = model(tokens, mem, mask), model(tokens, mem3, mask3)
    torch.testing.assert_close(a[:, : 2 * cs], b[:, : 2 * cs])
    assert not torch.allclose(a[:, 2 * cs :], b[:, 2 * cs :])


def test_memories_pass_through_the_codec_straight_through():
    from model.codecs import make_codec

    model = make_model().train()
    tokens, refs, valid = _served_batch(model)
    codec = make_codec("int8")
    raw, _ = continual_memories(model, refs, valid, schedule="serving", sparsify=True)
    coded, _ = continual_memories(model, refs, valid, schedule="serving", sparsify=True, codec=codec)
    B, C, M = coded.shape[:3]
    # the forward sees exactly what the bank would return after storing the memory
    stored = codec.round_trip(raw.detach().reshape(B * C * M, *raw.shape[3:])).reshape(raw.shape)
    torch.testing.assert_close(coded.detach(), stored)
    assert not torch.equal(coded.detach(), raw.detach())
    # and the gradient is the identity's: the same as without the codec, evaluated at the coded memories
    g_coded = torch.autograd.grad(coded.sum(), model.blocks[0].attn.wqkv.weight)[0]
    g_raw = torch.autograd.grad(raw.sum(), model.blocks[0].attn.wqkv.weight)[0]
    torch.testing.assert_close(g_coded, g_raw)


def test_encoding_each_reference_once_gives_the_same_memories():
    """ref_unique/ref_slot (adjacent chunks retrieve the same references) equals encoding every
    slot; gradients too."""
    model = make_model().train()
    tokens, refs, valid = _served_batch(model, C=4, M=3)
    refs[:, 2] = refs[:, 1]  # chunk 2 retrieved what chunk 1 did
    valid[0, 3, 2] = False
    flat = refs.reshape(-1, refs.shape[-1])
    unique, inverse = torch.unique(flat, dim=0, return_inverse=True)
    slot = torch.where(valid, inverse.view(valid.shape), -1)
    assert len(unique) < flat.shape[0]
    for schedule in ("serving", "paper"):
        a = continual_memories(model, refs, valid, schedule=schedule, sparsify=True)
        b = continual_memories(model, refs, valid, schedule=schedule, sparsify=True, unique=unique, slot=slot)
        torch.testing.assert_close(a[0], b[0])
        assert torch.equal(a[1], b[1])
        ga = torch.autograd.grad(lm_loss(model, tokens, *a), model.blocks[0].attn.wqkv.weight)[0]
        gb = torch.autograd.grad(lm_loss(model, tokens, *b), model.blocks[0].attn.wqkv.weight)[0]
        torch.testing.assert_close(ga, gb)
