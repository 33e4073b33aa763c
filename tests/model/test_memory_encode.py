"""encode_references' CPU work order: blocks of ENCODE_ROWS token rows, the fused causal kernel
for right-padded batches and the explicit mask for a pad between real tokens. Neither may
change what a reference's memory holds."""

import torch

from model import encode_references
from model.memory import ENCODE_ROWS

from .helpers import make_model


def right_padded(gen, cfg, lengths):
    """References of distinct tokens: a repeated token ties with itself in layer 0, and which
    copy float32 keeps may depend on the row it sits in (another batch shape, another CPU)."""
    refs = torch.full((len(lengths), max(lengths)), cfg.pad_id, dtype=torch.long)
    for b, n in enumerate(lengths):
        refs[b, :n] = torch.randperm(cfg.vocab_size - 4, generator=gen)[:n] + 4
    return refs


def test_a_batch_of_several_blocks_equals_its_references_alone():
    model = make_model(n_heads=4, n_kv_heads=2, n_layers=2, n_mem_layers=2)
    cfg = model.config
    per_block = ENCODE_ROWS // (cfg.ref_max_tokens + 1)
    gen = torch.Generator().manual_seed(11)
    lengths = torch.randint(1, cfg.ref_max_tokens + 1, (2 * per_block + 3,), generator=gen).tolist()
    lengths[0] = cfg.ref_max_tokens  # the batch is as wide as a reference may be
    refs = right_padded(gen, cfg, lengths)
    with torch.no_grad():
        batch = encode_references(model, refs, top_k=5)
        for b in (0, 1, per_block - 1, per_block, 2 * per_block + 2):  # both sides of each cut
            alone = encode_references(model, refs[b : b + 1], top_k=5)  # its own block, same width
            torch.testing.assert_close(batch.kv[b], alone.kv[0], atol=1e-5, rtol=1e-5)
            assert torch.equal(batch.positions[b], alone.positions[0])


def test_interior_pad_takes_the_masked_path_and_right_padding_the_causal_one_alike():
    """A batch holding one reference with a pad inside runs every reference through the explicit
    mask; the right-padded references must come out as they do through the causal kernel."""
    model = make_model(n_heads=4, n_kv_heads=1, n_layers=3, n_mem_layers=3)
    cfg = model.config
    gen = torch.Generator().manual_seed(12)
    refs = right_padded(gen, cfg, [20, 13, 7])
    holed = refs[:1].clone()
    holed[0, 5] = cfg.pad_id  # a pad between real tokens
    with torch.no_grad():
        causal = encode_references(model, refs, top_k=4)
        masked = encode_references(model, torch.cat([refs, holed]), top_k=4)
        hole = encode_references(model, holed, top_k=4)
    for b in range(3):
        torch.testing.assert_close(masked.kv[b], causal.kv[b], atol=1e-5, rtol=1e-5)
        assert torch.equal(masked.positions[b], causal.positions[b])
    # the pad is neither kept nor read: the reference differs from its unholed self
    assert not (hole.positions == 6).any()  # token 5 sits at position 6
    assert not torch.allclose(hole.kv[0], causal.kv[0])
    assert hole.mask.sum().item() == 4
    with torch.no_grad():  # nothing reads a pad: what its embedding holds changes no memory
        model.tok_emb.weight[cfg.pad_id] += torch.randn(cfg.d_model, generator=gen)
        for refs_, before in ((holed, hole), (refs, causal)):
            after = encode_references(model, refs_, top_k=4)
            torch.testing.assert_close(after.kv, before.kv, atol=1e-5, rtol=1e-5)
            assert torch.equal(after.positions, before.positions)


def test_gradients_reach_the_kept_keys_and_values_through_the_blocks():
    """Training encodes with gradients: each block's part must stay in the graph."""
    model = make_model(n_heads=4, n_kv_heads=2, n_layers=2, n_mem_layers=2).train()
    cfg = model.config
    per_block = ENCODE_ROWS // (cfg.ref_max_tokens + 1)
    gen = torch.Generator().manual_seed(13)
    refs = right_padded(gen, cfg, [cfg.ref_max_tokens] * (per_block + 2))
    enc = encode_references(model, refs, top_k=3)
    enc.kv[-1].sum().backward()  # a reference of the second block
    assert model.blocks[0].attn.wqkv.weight.grad.abs().sum() > 0
    grad = model.tok_emb.weight.grad
    assert grad[refs[-1]].abs().sum() > 0
    others = sorted(set(refs[0].tolist()) - set(refs[-1].tolist()))  # tokens of another block only
    assert others and grad[others].abs().sum() == 0


def test_keeping_every_token_skips_the_score_and_keeps_what_the_score_would():
    """top_k at least every reference's length: the score cannot change the choice, so it is
    skipped; the memories equal those of the scored path (a longer neighbour forces that path)."""
    model = make_model(n_heads=4, n_kv_heads=2, n_layers=3, n_mem_layers=2)
    cfg = model.config
    gen = torch.Generator().manual_seed(14)
    refs = right_padded(gen, cfg, [20, 6, 9, 10, 0])
    with torch.no_grad():
        scored = encode_references(model, refs, top_k=10)  # the 20-token one: top 10 of 20
        kept_all = encode_references(model, refs[1:], top_k=10)  # same width, every token fits
    torch.testing.assert_close(kept_all.kv, scored.kv[1:], atol=1e-5, rtol=1e-5)
    assert torch.equal(kept_all.positions, scored.positions[1:])
    assert torch.equal(kept_all.mask, scored.mask[1:])
    assert kept_all.mask.sum(1).tolist() == [6, 9, 10, 0]


def test_the_last_memory_layer_computes_no_queries_when_every_token_is_kept():
    model = make_model(n_heads=4, n_kv_heads=2, n_layers=3, n_mem_layers=2)
    cfg = model.config
    gen = torch.Generator().manual_seed(15)
    refs = right_padded(gen, cfg, [12, 7])
    with torch.no_grad():
        before = encode_references(model, refs, top_k=12)
        model.blocks[1].attn.wqkv.weight[: cfg.n_heads * cfg.head_dim].add_(1.0)  # its queries
        after = encode_references(model, refs, top_k=12)
    assert torch.equal(before.kv, after.kv) and torch.equal(before.positions, after.positions)


def test_the_in_place_mlp_without_gradients_equals_the_module_with_them():
    model = make_model(n_heads=4, n_kv_heads=2, n_layers=3, n_mem_layers=3)
    gen = torch.Generator().manual_seed(16)
    refs = right_padded(gen, model.config, [15, 4, 9])
    with torch.no_grad():
        in_place = encode_references(model, refs, top_k=6)
    module = encode_references(model, refs, top_k=6)  # gradients on: the SwiGLU module's path
    torch.testing.assert_close(in_place.kv, module.kv.detach(), atol=1e-6, rtol=1e-6)
    assert torch.equal(in_place.positions, module.positions)
