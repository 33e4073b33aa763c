"""Dedup decisions: equal to brute force, independent of row order and partitioning."""

from __future__ import annotations

import random
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipelines.dedup import bucket_collisions, exact_duplicates, merge_min, partition_of, resolve_kept
from pipelines.minhash import MinHashConfig, band_keys, signatures

FIXTURE = Path(__file__).parent / "fixtures" / "foldoc_excerpts.txt"


# --- brute-force references -------------------------------------------------------------------


def brute_collisions(keys, ranks) -> dict[int, int]:
    """dup rank -> minimum, over its buckets, of the bucket's earliest member (if earlier)."""
    buckets = defaultdict(set)
    for k, r in zip(keys, ranks):
        buckets[int(k)].add(int(r))
    out: dict[int, int] = {}
    for members in buckets.values():
        first = min(members)
        for r in members - {first}:
            out[r] = min(out.get(r, first), first)
    return out


def brute_follow(dup: dict[int, int], r: int) -> int:
    while r in dup:
        r = dup[r]
    return r


def as_dict(dup_ranks, earliest) -> dict[int, int]:
    assert dup_ranks.dtype == np.int64 and earliest.dtype == np.int64
    assert np.all(np.diff(dup_ranks) > 0), "sorted, one row per duplicate"
    return dict(zip(dup_ranks.tolist(), earliest.tolist()))


def partitioned(fn, keys, ranks, n_parts, order):
    """Shuffle rows, split them by partition_of(key), run fn per partition, merge."""
    keys, ranks = np.asarray(keys, np.int64)[order], np.asarray(ranks, np.int64)[order]
    part = partition_of(keys, n_parts)
    outs = [fn(keys[part == p], ranks[part == p]) for p in range(n_parts)]
    return merge_min([o[0] for o in outs], [o[1] for o in outs])


# rows: (bucket key, rank); small ranges force many collisions, repeats and big buckets
rows_strategy = st.lists(st.tuples(st.integers(-5, 12), st.integers(0, 40)), max_size=120)


@settings(max_examples=200, deadline=None)
@given(rows_strategy, st.integers(1, 6), st.randoms(use_true_random=False))
def test_bucket_collisions_match_brute_force_under_any_partitioning(rows, n_parts, rnd):
    keys = [k * 0x9E3779B97F4A7C15 % (1 << 63) - (1 << 62) for k, _ in rows]  # spread int64
    ranks = [r for _, r in rows]
    expected = brute_collisions(keys, ranks)
    assert as_dict(*bucket_collisions(keys, ranks)) == expected
    order = list(range(len(rows)))
    rnd.shuffle(order)
    assert as_dict(*partitioned(bucket_collisions, keys, ranks, n_parts, order)) == expected


@settings(max_examples=100, deadline=None)
@given(
    st.lists(st.tuples(st.integers(0, 30), st.integers(-3, 30)), max_size=80),
    st.integers(1, 8),
    st.randoms(use_true_random=False),
)
def test_merge_min_is_exact_and_associative(pairs, n_chunks, rnd):
    dup = np.array([max(a, b) + 1 for a, b in pairs], dtype=np.int64)
    earliest = np.array([b if b <= a else a for a, b in pairs], dtype=np.int64)
    expected: dict[int, int] = {}
    for d, e in zip(dup.tolist(), earliest.tolist()):
        expected[d] = min(expected.get(d, e), e)
    cuts = sorted(rnd.randrange(len(pairs) + 1) for _ in range(n_chunks - 1))
    bounds = [0, *cuts, len(pairs)]
    chunks = [(dup[a:b], earliest[a:b]) for a, b in zip(bounds, bounds[1:])]
    flat = merge_min([c[0] for c in chunks], [c[1] for c in chunks])
    assert as_dict(*flat) == expected
    partial = [merge_min([c[0]], [c[1]]) for c in chunks]  # a tree of merges
    tree = merge_min([p[0] for p in partial], [p[1] for p in partial])
    assert as_dict(*tree) == expected


@settings(max_examples=100, deadline=None)
@given(st.lists(st.integers(0, 15), max_size=60), st.integers(1, 5), st.randoms(use_true_random=False))
def test_exact_duplicates_point_to_group_minimum(hashes, n_parts, rnd):
    ranks = list(range(len(hashes)))
    rnd.shuffle(ranks)  # corpus order differs from row order
    first: dict[int, int] = {}
    for h, r in zip(hashes, ranks):
        first[h] = min(first.get(h, r), r)
    expected = {r: first[h] for h, r in zip(hashes, ranks) if r != first[h]}
    dup, kept = exact_duplicates(hashes, ranks)
    assert as_dict(dup, kept) == expected
    assert not set(kept.tolist()) & set(dup.tolist())  # kept twins are kept
    order = list(range(len(hashes)))
    rnd.shuffle(order)
    assert as_dict(*partitioned(exact_duplicates, hashes, ranks, n_parts, order)) == expected


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, 10**6), min_size=0, max_size=80, unique=True), st.randoms(use_true_random=False))
def test_resolve_kept_lands_on_a_non_duplicate(ranks, rnd):
    ranks = sorted(ranks)
    # random forest: each duplicate points to some strictly smaller rank of the list
    pointers: dict[int, int] = {}
    for i, r in enumerate(ranks):
        if i and rnd.random() < 0.7:
            pointers[r] = ranks[rnd.randrange(i)]
    items = list(pointers.items())
    rnd.shuffle(items)  # input order must not matter
    dup = np.array([d for d, _ in items], dtype=np.int64)
    ptr = np.array([p for _, p in items], dtype=np.int64)
    kept = resolve_kept(dup, ptr)
    assert kept.dtype == np.int64 and kept.shape == dup.shape
    assert not set(kept.tolist()) & set(pointers)
    assert kept.tolist() == [brute_follow(pointers, d) for d in dup.tolist()]


def test_resolve_kept_long_chain():
    n = 100_000  # 1 -> 0, 2 -> 1, ...: needs log2(n) jumping rounds, not n
    dup = np.arange(1, n, dtype=np.int64)
    assert (resolve_kept(dup, dup - 1) == 0).all()


def test_resolve_kept_rejects_bad_input():
    with pytest.raises(ValueError, match="smaller"):
        resolve_kept(np.array([3, 5]), np.array([1, 5]))
    with pytest.raises(ValueError, match="distinct"):
        resolve_kept(np.array([3, 3]), np.array([1, 2]))
    assert resolve_kept(np.array([], np.int64), np.array([], np.int64)).shape == (0,)


def test_near_duplicate_semantics_chain():
    # A=0 ~ B=1 (bucket 10), B ~ C=2 (bucket 20), D=3 collides only with later E=4 (bucket 30)
    keys = [10, 10, 20, 20, 30, 30, 40]
    ranks = [0, 1, 1, 2, 3, 4, 5]
    dup, earliest = bucket_collisions(keys, ranks)
    assert as_dict(dup, earliest) == {1: 0, 2: 1, 4: 3}
    # C is dropped (shares a bucket with earlier B) and reports A, the kept end of the chain
    assert resolve_kept(dup, earliest).tolist() == [0, 0, 3]


def test_partition_of_is_stable_and_in_range():
    keys = np.array([0, 1, -1, 2**63 - 1, -(2**63), 12345], dtype=np.int64)
    parts = partition_of(keys, 7)
    assert parts.dtype == np.int64 and ((parts >= 0) & (parts < 7)).all()
    # pinned: a change here would move rows between partitions of resumed runs
    assert parts.tolist() == PINNED_PARTITIONS
    spread = np.bincount(partition_of(np.arange(70_000, dtype=np.int64) << 4, 7), minlength=7)
    assert spread.min() > 9_000  # band keys carry the band index in low bits: still even
    with pytest.raises(ValueError, match="n_partitions"):
        partition_of(keys, 0)


PINNED_PARTITIONS = [2, 3, 4, 6, 4, 0]  # = splitmix64(key ^ 0x6A09E667F3BCC909) % 7


# --- end to end on real text ------------------------------------------------------------------


def test_near_dup_pipeline_on_real_text_same_for_any_worker_count():
    entries = [b.split("\n", 1)[1].strip() for b in FIXTURE.read_text().split("\n## ")[1:]]
    rng = random.Random(1)
    docs, twin_of = [], {}
    for e in entries:
        docs.append(e)
    for i, e in enumerate(entries):  # later near copies: one word changed
        w = e.split(" ")
        w[rng.randrange(len(w))] = "changed"
        twin_of[len(docs)] = i
        docs.append(" ".join(w))
    cfg = MinHashConfig()
    keys = band_keys(signatures(docs, cfg), cfg)
    ranks = np.repeat(np.arange(len(docs), dtype=np.int64), cfg.bands)
    flat = keys.ravel()
    results = set()
    for n_parts in (1, 2, 3, 7):
        order = np.random.default_rng(n_parts).permutation(len(flat))
        dup, earliest = partitioned(bucket_collisions, flat, ranks, n_parts, order)
        kept = resolve_kept(dup, earliest)
        results.add((tuple(dup.tolist()), tuple(kept.tolist())))
    assert len(results) == 1
    ((dup, kept),) = results
    assert dict(zip(dup, kept)) == twin_of
