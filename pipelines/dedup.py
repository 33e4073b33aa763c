"""Deterministic duplicate decisions from (key, rank) pairs; pure numpy, no Ray.

A *rank* is an int64 giving the global order of a document (corpus order: smaller = earlier =
kept). It must not depend on how the corpus is split across workers (e.g. file index and line
number packed into one int64), because every decision below is a function of ranks only.

Semantics (near duplicates, MinHash-LSH):

* A document is a near duplicate iff it shares at least one LSH bucket (band key) with an
  *earlier* document. Documents that share no bucket with any earlier document are kept, so
  the kept set is independent in the collision graph (no two kept documents collide) and every
  rejected document collides with some earlier one.
* Its reported twin is the kept document reached by following earliest-collider links
  (``bucket_collisions`` gives each duplicate the earliest document it shares a bucket with;
  ``resolve_kept`` follows those links until it reaches a kept document).

Why this and not connected components (union-find) or the greedy "collides with an earlier
*kept* document" rule: the decision for a document needs only its own buckets, so it is

* parallel by bucket: rows are hash-partitioned by band key (``partition_of``), each
  partition is solved alone (``bucket_collisions``), and the per-partition answers combine by an
  exact, associative min-reduce (``merge_min``) on the small set of duplicates;
* deterministic whatever the number of workers or the order of rows, since it depends only on
  the set of (key, rank) rows;
* free of any single-process clustering step: the only global step is ``resolve_kept``, a
  vectorized pointer-jumping pass over the duplicates alone, O(d log chain) with numpy.

The price: in a chain A < B < C where A~B and B~C but A and C do not collide, C is dropped
(it collides with the earlier B) and reports A as its twin, although C and A are not similar.
Connected components would drop exactly the same documents and more (a document whose only
colliders are later ones); the greedy rule would keep C but needs a sequential pass in rank
order, or as many parallel rounds as the longest chain.

Exact duplicates are the special case of one key per document (the normalized content hash):
every member of a key group except the earliest is a duplicate of the earliest, which is never
itself a duplicate, so no pointer following is needed.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from pipelines.minhash import mix64

__all__ = ["exact_duplicates", "bucket_collisions", "merge_min", "resolve_kept", "partition_of"]

_EMPTY = np.empty(0, dtype=np.int64)


def _pairs(keys, ranks) -> tuple[np.ndarray, np.ndarray]:
    keys = np.asarray(keys, dtype=np.int64).ravel()
    ranks = np.asarray(ranks, dtype=np.int64).ravel()
    if keys.shape != ranks.shape:
        raise ValueError(f"keys and ranks must have the same length, got {len(keys)} and {len(ranks)}")
    return keys, ranks


def _min_per_dup(dup: np.ndarray, earliest: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """One row per distinct dup rank holding its minimum earliest rank; sorted by dup rank."""
    if len(dup) == 0:
        return _EMPTY.copy(), _EMPTY.copy()
    order = np.lexsort((earliest, dup))
    dup, earliest = dup[order], earliest[order]
    first = np.r_[True, dup[1:] != dup[:-1]]
    return dup[first], earliest[first]


def bucket_collisions(band_keys, ranks) -> tuple[np.ndarray, np.ndarray]:
    """Documents that share a bucket with an earlier document, and their earliest collider.

    ``band_keys`` and ``ranks`` are aligned int64 rows (bucket key, document rank), e.g. every
    band of every document in one hash partition. Repeated (key, rank) rows are harmless.
    Returns ``(dup_ranks, earliest_ranks)``, int64, one row per duplicate document, sorted by
    ``dup_ranks``; ``earliest_ranks[i] < dup_ranks[i]`` is the minimum, over the buckets of
    ``dup_ranks[i]`` in this input, of the bucket's earliest member. Correct per partition as
    long as all rows of a bucket are in the same partition; combine partitions with
    ``merge_min``.
    """
    keys, ranks = _pairs(band_keys, ranks)
    if len(keys) == 0:
        return _EMPTY.copy(), _EMPTY.copy()
    order = np.lexsort((ranks, keys))  # by key, then rank
    keys, ranks = keys[order], ranks[order]
    new_key = np.r_[True, keys[1:] != keys[:-1]]
    # drop repeated (key, rank) rows: a document does not collide with itself
    distinct = new_key | np.r_[True, ranks[1:] != ranks[:-1]]
    keys, ranks, new_key = keys[distinct], ranks[distinct], new_key[distinct]
    group_start = np.maximum.accumulate(np.where(new_key, np.arange(len(keys)), 0))
    earliest = ranks[group_start]
    member = ~new_key  # every row but the first (earliest) of its bucket
    return _min_per_dup(ranks[member], earliest[member])


def exact_duplicates(keys, ranks) -> tuple[np.ndarray, np.ndarray]:
    """Exact duplicates: for each group of equal keys, every member but the earliest.

    Returns ``(dup_ranks, kept_ranks)``, int64, aligned and sorted by ``dup_ranks``:
    ``kept_ranks[i]`` is the minimum rank of ``dup_ranks[i]``'s key group. With one key per
    document (a content hash) that kept rank is never itself a duplicate. Partitioned by
    ``partition_of(keys)``, per-partition results simply concatenate (``merge_min`` works too).
    """
    return bucket_collisions(keys, ranks)


def merge_min(
    dup_ranks_list: Sequence[np.ndarray], earliest_list: Sequence[np.ndarray]
) -> tuple[np.ndarray, np.ndarray]:
    """Combine partition outputs: per duplicate document, the minimum earliest collider.

    Exact and associative (a min over rows), so it can also run as a tree of partial merges.
    Returns ``(dup_ranks, earliest_ranks)`` like ``bucket_collisions``.
    """
    if len(dup_ranks_list) != len(earliest_list):
        raise ValueError(
            "dup_ranks_list and earliest_list must have the same length, got "
            f"{len(dup_ranks_list)} and {len(earliest_list)}"
        )
    if len(dup_ranks_list) == 0:
        return _EMPTY.copy(), _EMPTY.copy()
    dup = np.concatenate([np.asarray(d, dtype=np.int64).ravel() for d in dup_ranks_list])
    earliest = np.concatenate([np.asarray(e, dtype=np.int64).ravel() for e in earliest_list])
    if dup.shape != earliest.shape:
        raise ValueError(f"dup ranks and earliest ranks differ in total length: {len(dup)} and {len(earliest)}")
    return _min_per_dup(dup, earliest)


def resolve_kept(dup_ranks, pointer_ranks) -> np.ndarray:
    """Kept twin of every duplicate, by following pointers to a non-duplicate rank.

    ``dup_ranks`` (distinct) and ``pointer_ranks`` are aligned int64 arrays with
    ``pointer_ranks[i] < dup_ranks[i]`` (checked: it guarantees termination). Returns int64
    ``kept_twin_ranks`` aligned with the input order: for each duplicate the rank reached by
    following pointers until a rank that is not in ``dup_ranks``. Pointer jumping (each round
    replaces a pointer by its target's pointer) needs O(log longest chain) vectorized rounds.
    """
    dup, ptr = _pairs(dup_ranks, pointer_ranks)
    if len(dup) == 0:
        return _EMPTY.copy()
    if np.any(ptr >= dup):
        bad = int(np.flatnonzero(ptr >= dup)[0])
        raise ValueError(f"pointer_ranks must be smaller than dup_ranks; row {bad}: {dup[bad]} -> {ptr[bad]}")
    order = np.argsort(dup, kind="stable")
    dup_sorted, ptr = dup[order], ptr[order].copy()
    if np.any(dup_sorted[1:] == dup_sorted[:-1]):
        raise ValueError("dup_ranks must be distinct (use merge_min first)")
    last = len(dup_sorted) - 1
    while True:
        at = np.minimum(np.searchsorted(dup_sorted, ptr), last)
        hop = dup_sorted[at] == ptr  # the target is itself a duplicate: jump over it
        if not hop.any():
            break
        # targets' pointers are read before any write (fancy indexing copies), so this is one
        # synchronous doubling step
        ptr[hop] = ptr[at[hop]]
    kept = np.empty_like(ptr)
    kept[order] = ptr
    return kept


def partition_of(keys, n_partitions: int) -> np.ndarray:
    """Stable hash partition in ``[0, n_partitions)`` of int64 keys, the same on every process.

    Keys are re-mixed first, so structured keys (the band index in the low bits of band keys,
    or sequential ids) still spread evenly.
    """
    if not isinstance(n_partitions, (int, np.integer)) or n_partitions < 1:
        raise ValueError(f"n_partitions must be an int >= 1, got {n_partitions!r}")
    keys = np.asarray(keys, dtype=np.int64)
    mixed = mix64(keys.view(np.uint64) ^ np.uint64(0x6A09E667F3BCC909))
    return (mixed % np.uint64(n_partitions)).astype(np.int64)
