"""Writing memories: encode_references and its top-k sparsification against the naive
per-layer, per-head, per-token implementation."""

import math

import hypothesis.strategies as st
import pytest
import torch
from hypothesis import given, settings

from model import chunk_windows, encode_references
from model.memory import token_log_scores

from .helpers import make_model, random_tokens
from .naive import NaiveModel


def padded_refs(gen, cfg, lengths):
    refs = torch.full((len(lengths), max(lengths)), cfg.pad_id, dtype=torch.long)
    for b, n in enumerate(lengths):
        refs[b, :n] = random_tokens(gen, cfg, n)
    return refs


def assert_matches_naive(model, refs, lengths, top_k, combine="sum"):
    with torch.no_grad():
        enc = encode_references(model, refs, top_k=top_k)
    naive = NaiveModel(model)
    cfg = model.config
    assert enc.kv.shape == (len(lengths), cfg.n_mem_layers, 2, cfg.n_kv_heads, top_k, cfg.head_dim)
    assert enc.positions.shape == (len(lengths), cfg.n_mem_layers, cfg.n_kv_heads, top_k)
    for b, n in enumerate(lengths):
        expected = naive.encode(refs[b, :n], top_k, combine)
        kept = min(top_k, n)
        assert enc.mask[b].tolist() == [s < kept for s in range(top_k)]
        for layer in range(cfg.n_mem_layers):
            for h in range(cfg.n_kv_heads):
                want = expected[layer][h]
                assert enc.positions[b, layer, h, :kept].tolist() == want["positions"]
                assert (enc.positions[b, layer, h, kept:] == -1).all()
                if kept:
                    got_k, got_v = enc.kv[b, layer, 0, h, :kept], enc.kv[b, layer, 1, h, :kept]
                    torch.testing.assert_close(got_k.double(), torch.stack(want["keys"]), atol=1e-5, rtol=1e-5)
                    torch.testing.assert_close(got_v.double(), torch.stack(want["values"]), atol=1e-5, rtol=1e-5)
                assert (enc.kv[b, layer, :, h, kept:] == 0).all()


@pytest.mark.parametrize(
    "n_heads,n_kv_heads,n_layers,n_mem_layers,combine",
    [(4, 2, 2, 2, "sum"), (4, 1, 3, 2, "max"), (4, 4, 2, 1, "mean"), (4, 2, 2, 2, "max")],
)
def test_encode_equals_naive(n_heads, n_kv_heads, n_layers, n_mem_layers, combine):
    model = make_model(
        n_heads=n_heads, n_kv_heads=n_kv_heads, n_layers=n_layers, n_mem_layers=n_mem_layers, score_combine=combine
    )
    gen = torch.Generator().manual_seed(3)
    lengths = [14, 9, 3, 0]  # padded; shorter than k; empty
    assert_matches_naive(model, padded_refs(gen, model.config, lengths), lengths, 5, combine)


def test_scores_equal_naive_sum_of_exponentials():
    model = make_model(n_heads=4, n_kv_heads=2)
    gen = torch.Generator().manual_seed(4)
    refs = padded_refs(gen, model.config, [11, 7])
    naive = NaiveModel(model)
    block = model.blocks[0]
    tokens = torch.cat([torch.full((2, 1), model.config.ref_bos_id), refs], 1)
    scored = tokens != model.config.pad_id
    scored[:, 0] = False
    with torch.no_grad():
        q, k, _ = block.attn.qkv(block.attn_norm(model.tok_emb(tokens)))
        for combine in ("sum", "mean", "max"):
            log_w = token_log_scores(q, k, scored, combine)
            for b, n in enumerate([11, 7]):
                want = naive.encode(refs[b, :n], 4, combine)[0]
                for h in range(2):
                    got = log_w[b, h, 1 : n + 1].double()
                    torch.testing.assert_close(
                        got, torch.tensor(want[h]["scores"], dtype=torch.float64).log(), atol=1e-5, rtol=1e-5
                    )
                    assert torch.isneginf(log_w[b, h, 0]) and torch.isneginf(log_w[b, h, n + 1 :]).all()


def test_top_k_of_all_tokens_keeps_every_token_in_order():
    model = make_model()
    gen = torch.Generator().manual_seed(5)
    refs = padded_refs(gen, model.config, [10, 6])
    with torch.no_grad():
        enc = encode_references(model, refs, top_k=model.config.ref_max_tokens)
    assert enc.mask.sum(1).tolist() == [10, 6]
    assert enc.positions[0, :, :, :10].eq(torch.arange(1, 11)).all()
    assert enc.positions[1, :, :, :6].eq(torch.arange(1, 7)).all()


def test_scores_stay_finite_where_float32_exp_overflows():
    model = make_model(n_heads=4, n_kv_heads=2, n_layers=1, n_mem_layers=1)
    with torch.no_grad():
        model.blocks[0].attn.wqkv.weight.mul_(6.0)
    gen = torch.Generator().manual_seed(6)
    refs = padded_refs(gen, model.config, [12])
    tokens = torch.cat([torch.full((1, 1), model.config.ref_bos_id), refs], 1)
    with torch.no_grad():
        q, k, _ = model.blocks[0].attn.qkv(model.blocks[0].attn_norm(model.tok_emb(tokens)))
    assert (q @ k.repeat_interleave(2, 1).transpose(-1, -2)).abs().max() / math.sqrt(8) > 100
    assert_matches_naive(model, refs, [12], 4)


def test_nothing_after_the_last_memory_layer_is_computed():
    model = make_model(n_layers=2, n_mem_layers=1)
    gen = torch.Generator().manual_seed(7)
    refs = padded_refs(gen, model.config, [9, 13])
    with torch.no_grad():
        before = encode_references(model, refs)
        for name, p in model.named_parameters():  # everything the last memory layer's K/V do not use
            if not (name.startswith("tok_emb") or name.startswith("blocks.0.attn")):
                p.add_(torch.randn_like(p))
        after = encode_references(model, refs)
    assert torch.equal(before.kv, after.kv) and torch.equal(before.positions, after.positions)


@settings(max_examples=25, deadline=None)
@given(
    lengths=st.lists(st.integers(0, 20), min_size=1, max_size=4), top_k=st.integers(1, 9), seed=st.integers(0, 2**16)
)
def test_each_reference_is_encoded_alone(lengths, top_k, seed):
    """Padding and batch neighbours change nothing; kept positions are real, sorted, unique."""
    model = make_model()
    gen = torch.Generator().manual_seed(seed)
    width = max(max(lengths), 1)
    # distinct tokens: a repeated token ties with itself in layer 0, and which copy float32
    # keeps may depend on the batch's shape (lengths [0, 10], top_k 1, seed 0 kept position 7
    # in the batch and 10 alone)
    refs = torch.full((len(lengths), width), model.config.pad_id, dtype=torch.long)
    for b, n in enumerate(lengths):
        refs[b, :n] = torch.randperm(model.config.vocab_size - 4, generator=gen)[:n] + 4
    with torch.no_grad():
        batch = encode_references(model, refs, top_k=top_k)
        for b, n in enumerate(lengths):
            alone = encode_references(model, refs[b : b + 1, : max(n, 1)], top_k=top_k)
            torch.testing.assert_close(batch.kv[b], alone.kv[0], atol=1e-5, rtol=1e-5)
            assert torch.equal(batch.positions[b], alone.positions[0])
            kept = batch.positions[b][batch.positions[b] >= 0].view(*batch.positions.shape[1:3], -1)
            assert kept.shape[-1] == min(n, top_k)
            assert ((kept >= 1) & (kept <= n)).all() and (kept.diff(dim=-1) > 0).all()


def test_chunk_windows_equal_a_loop():
    gen = torch.Generator().manual_seed(8)
    kv = torch.randn(2, 5, 1, 2, 2, 3, 4, generator=gen, requires_grad=True)
    mask = torch.rand(2, 5, 3, generator=gen) < 0.7
    win_kv, win_mask = chunk_windows(kv, mask, 3)
    assert win_kv.shape == (2, 5, 3, 1, 2, 2, 3, 4) and win_mask.shape == (2, 5, 3, 3)
    for c in range(5):
        for w in range(3):
            source = c - 2 + w
            if source < 0:
                assert not win_mask[:, c, w].any()
            else:
                assert torch.equal(win_kv[:, c, w], kv[:, source])
                assert torch.equal(win_mask[:, c, w], mask[:, source])
    win_kv.sum().backward()  # gradients reach the encoded references
    assert kv.grad[:, 0].eq(3).all() and kv.grad[:, 4].eq(1).all()


def test_bad_references_raise_clear_errors():
    model = make_model()
    cfg = model.config
    with pytest.raises(ValueError, match="ref_max_tokens"):
        encode_references(model, torch.full((1, cfg.ref_max_tokens + 1), 5))
    with pytest.raises(ValueError, match="ref_bos"):
        encode_references(model, torch.tensor([[cfg.ref_bos_id, 5, 6]]))
    with pytest.raises(ValueError, match="int64"):
        encode_references(model, torch.ones(1, 4))
    with pytest.raises(ValueError, match="top_k"):
        encode_references(model, torch.full((1, 4), 5), top_k=0)


def test_repeated_tokens_tie_and_the_earlier_position_wins():
    """Layer 0 scores depend on the token id only: repeats tie exactly."""
    model = make_model(n_layers=2, n_mem_layers=2)
    refs = torch.tensor([[9, 7, 7, 12, 7, 9, 7, 12]])
    assert_matches_naive(model, refs, [8], 3)
    with torch.no_grad():
        enc = encode_references(model, refs, top_k=3)
        again = encode_references(model, refs.repeat(3, 1), top_k=3)
    assert (again.positions == enc.positions).all()
