"""The selection score in its blocked, fused form (model.memory.token_log_scores) against a
float64 reference of the paper's formula, the float32 square it replaced, and the loop-based
float64 model on real text.

Selections are compared as sets of positions, never as bit patterns: where two tokens' float64
scores lie within the float32 tolerance of the k-th best, either may be kept (another CPU may
round them the other way); everywhere else the sets must be equal.
"""

import math

import pytest
import torch

from model import encode_references
from model.memory import SCORE_BLOCK, token_log_scores, top_tokens
from tests.conftest import foldoc_records

from .helpers import make_model
from .naive import NaiveModel

TOL = 1e-4  # on log scores: float32 log-sum-exp over <= 8 x 129 terms is ~1e-6 off


def reference_log_scores(q: torch.Tensor, k: torch.Tensor, scored: torch.Tensor, combine: str):
    """float64, one KV head at a time, the formula as written: log sum_i exp(q_i . k_j / sqrt(D))
    per query head over the scored i, then summed (or averaged, or maxed) over the head's group."""
    B, Hq, S, D = q.shape
    Hkv = k.shape[1]
    group = Hq // Hkv
    out = torch.full((B, Hkv, S), float("-inf"), dtype=torch.float64)
    for b in range(B):
        rows = scored[b].nonzero().flatten()
        if len(rows) == 0:
            continue
        for h in range(Hkv):
            per_head = torch.stack(
                [
                    (q[b, h * group + g, rows].double() @ k[b, h].double().T / math.sqrt(D)).logsumexp(0)
                    for g in range(group)
                ]
            )  # (group, S): log w_j of each query head
            if combine == "max":
                log_w = per_head.max(0).values
            else:
                log_w = per_head.logsumexp(0) - (math.log(group) if combine == "mean" else 0.0)
            out[b, h, rows] = log_w[rows]
    return out


def assert_same_selection(pos: torch.Tensor, ref_log_w: torch.Tensor, k: int, tol: float = TOL):
    """pos (..., k) from top_tokens against the float64 scores (..., S): the kept sets are equal
    except for tokens whose reference score is within tol of the k-th best (near ties)."""
    flat_pos, flat_ref = pos.reshape(-1, pos.shape[-1]), ref_log_w.reshape(-1, ref_log_w.shape[-1])
    for p, ref in zip(flat_pos, flat_ref):
        real = (ref > float("-inf")).nonzero().flatten()
        got = set(p[p >= 0].tolist())
        assert len(got) == min(k, len(real)), (p, ref)
        if not got:
            continue
        ranked = sorted(real.tolist(), key=lambda j: -ref[j].item())  # stable: earlier wins ties
        want = set(ranked[:k])
        boundary = ref[ranked[min(k, len(ranked)) - 1]].item()
        for j in got ^ want:
            assert abs(ref[j].item() - boundary) <= tol * max(1.0, abs(boundary)), (
                f"token {j} (score {ref[j].item():.6f}) differs from the float64 selection "
                f"(k-th best {boundary:.6f}): kept {sorted(got)}, expected {sorted(want)}"
            )


def random_qk(seed: int, B: int, Hq: int, Hkv: int, S: int, D: int, scale: float):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hq, S, D, generator=gen) * scale
    k = torch.randn(B, Hkv, S, D, generator=gen) * scale
    return q, k


def scored_mask(lengths: list[int], S: int) -> torch.Tensor:
    """Right-padded references behind ref_bos: tokens 1..n take part."""
    pos = torch.arange(S)[None, :]
    return (pos >= 1) & (pos <= torch.tensor(lengths)[:, None])


# 7 references (not a multiple of SCORE_BLOCK): empty, one token, short, full width
LENGTHS = [0, 1, 5, 17, 40, 64, 64]


@pytest.mark.parametrize("Hq,Hkv", [(8, 2), (8, 8), (8, 1), (4, 2)])
@pytest.mark.parametrize("combine", ["sum", "mean", "max"])
def test_score_equals_float64_reference(Hq, Hkv, combine):
    assert len(LENGTHS) % SCORE_BLOCK != 0
    S = max(LENGTHS) + 1
    q, k = random_qk(Hq * 10 + Hkv, len(LENGTHS), Hq, Hkv, S, 16, scale=1.0)
    scored = scored_mask(LENGTHS, S)
    log_w = token_log_scores(q, k, scored, combine)
    ref = reference_log_scores(q, k, scored, combine)
    assert log_w.dtype == torch.float32 and log_w.shape == ref.shape
    assert torch.equal(torch.isneginf(log_w), torch.isneginf(ref))  # ref_bos, pads, empty refs
    finite = ~torch.isneginf(ref)
    torch.testing.assert_close(log_w.double()[finite], ref[finite], atol=TOL, rtol=TOL)
    for top_k in (1, 3, 8, 32, S + 5):
        assert_same_selection(top_tokens(log_w, top_k), ref, top_k)


def test_score_stays_exact_where_float32_exp_overflows():
    """Logits above 100: exp overflows float32 (above 88.7) in a naive sum."""
    q, k = random_qk(1, 5, 8, 2, 33, 32, scale=6.0)
    scored = scored_mask([32, 32, 20, 3, 0], 33)
    assert (q @ k.repeat_interleave(4, 1).transpose(-1, -2)).abs().max() / math.sqrt(32) > 100
    for combine in ("sum", "max"):
        log_w = token_log_scores(q, k, scored, combine)
        ref = reference_log_scores(q, k, scored, combine)
        finite = ~torch.isneginf(ref)
        assert torch.isfinite(log_w[finite]).all()
        torch.testing.assert_close(log_w.double()[finite], ref[finite], atol=TOL, rtol=TOL)
        assert_same_selection(top_tokens(log_w, 8), ref, 8)


def materialized_log_scores(q, k, scored, combine):
    """The form it replaced: every head's (S x S) square at once in float32, scaled and masked
    apart, log-sum-exp over the strided query dim."""
    B, Hq, S, D = q.shape
    Hkv = k.shape[1]
    group = Hq // Hkv
    logits = torch.einsum("bhgid,bhjd->bhgij", q.float().view(B, Hkv, group, S, D), k.float())
    logits = (logits / math.sqrt(D)).masked_fill(~scored[:, None, None, :, None], float("-inf"))
    per_head = logits.logsumexp(dim=3)
    if combine == "max":
        log_w = per_head.amax(dim=2)
    else:
        log_w = per_head.logsumexp(dim=2) - (math.log(group) if combine == "mean" else 0.0)
    return log_w.masked_fill(~scored[:, None, :], float("-inf"))


@pytest.mark.parametrize("combine", ["sum", "mean", "max"])
def test_score_equals_the_materialized_square_it_replaced(combine):
    q, k = random_qk(2, 9, 8, 2, 129, 32, scale=1.0)  # the demo model's shape
    scored = scored_mask([128, 128, 100, 77, 64, 31, 8, 1, 0], 129)
    new, old = token_log_scores(q, k, scored, combine), materialized_log_scores(q, k, scored, combine)
    assert torch.equal(torch.isneginf(new), torch.isneginf(old))
    finite = ~torch.isneginf(old)
    torch.testing.assert_close(new[finite], old[finite], atol=TOL, rtol=TOL)
    ref = reference_log_scores(q, k, scored, combine)
    assert_same_selection(top_tokens(new, 8), ref, 8)
    assert_same_selection(top_tokens(old, 8), ref, 8)


def byte_references(n: int, width: int) -> list[list[int]]:
    """Real text as byte tokens (ids 4..259): FOLDOC entries cut to at most `width` bytes; bytes
    repeat often, so layer 0 (where a token's score depends on its id only) ties often."""
    return [[b + 4 for b in r["text"].encode("utf-8")[:width]] for r in foldoc_records(n, min_words=5)]


@pytest.mark.parametrize("n_heads,n_kv_heads,top_k", [(8, 2, 4), (4, 4, 8), (8, 1, 1)])
def test_real_text_selection_equals_float64_model(n_heads, n_kv_heads, top_k):
    """encode_references end to end on a padded batch of real text against the loop-based float64
    model (tests/model/naive.py): the same kept tokens. Repeated tokens tie exactly in layer 0 of
    the float64 model; in float32 a GEMM may round two equal rows differently by their position,
    so which occurrence is kept at the boundary is left to the near-tie rule, not asserted."""
    model = make_model(
        vocab_size=260,
        n_heads=n_heads,
        n_kv_heads=n_kv_heads,
        head_dim=8,
        d_model=8 * n_heads,
        n_layers=2,
        n_mem_layers=2,
        ref_max_tokens=48,
    )
    cfg = model.config
    refs = byte_references(5, 48)
    refs[3] = refs[3][:7]  # a short one: the batch is padded
    batch = torch.full((len(refs), max(map(len, refs))), cfg.pad_id, dtype=torch.long)
    for b, r in enumerate(refs):
        batch[b, : len(r)] = torch.tensor(r)
    with torch.no_grad():
        enc = encode_references(model, batch, top_k=top_k)
    naive = NaiveModel(model)
    for b, r in enumerate(refs):
        expected = naive.encode(r, top_k, cfg.score_combine)
        for layer in range(cfg.n_mem_layers):
            ref_scores = torch.full((cfg.n_kv_heads, len(r) + 1), float("-inf"), dtype=torch.float64)
            for h in range(cfg.n_kv_heads):
                ref_scores[h, 1:] = torch.tensor(expected[layer][h]["scores"], dtype=torch.float64).log()
            assert_same_selection(enc.positions[b, layer], ref_scores, top_k)
