"""Vector search over the embeddings table: exact search agrees with numpy, the ANN index keeps
recall@5 >= 0.9 against it, and the size threshold decides whether an index exists.

The ANN-recall tests use synthetic vectors: embedding the few thousand references an index needs
would take minutes on 2 cores. They are built like real sentence embeddings (a shared direction,
topics, sub-topics, noise), calibrated to the FOLDOC bank's MiniLM vectors: mean pairwise cosine
0.12 (real 0.125), nearest neighbour 0.67 (0.66), 5th neighbour 0.52 (0.55). Real embeddings are
searched in tests/pipelines/test_embed_step.py.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from pipelines.embed_step import EMBEDDINGS_SCHEMA
from storage.bank import Bank
from storage.vectors import (
    AnnParams,
    VectorIndexError,
    build_index,
    exact_topk,
    has_index,
    index_info,
    recall_at_k,
    search,
)

DIM = 384
N = 3000


def unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def embedding_like(n: int, seed: int = 0, topics: int = 100, sub: int = 8) -> np.ndarray:
    rng = np.random.default_rng(seed)
    mean = unit(rng.normal(size=DIM))
    centers = unit(rng.normal(size=(topics, DIM)))
    subs = unit(rng.normal(size=(topics, sub, DIM)))
    t, s = rng.integers(0, topics, n), rng.integers(0, sub, n)
    x = 0.35 * mean + 0.55 * centers[t] + 0.5 * subs[t, s] + 0.6 * unit(rng.normal(size=(n, DIM)))
    return unit(x).astype(np.float32)


def rows(vectors: np.ndarray, start: int = 0) -> pa.RecordBatch:
    n = len(vectors)
    ids = [f"ref-{i:05d}" for i in range(start, start + n)]
    return pa.RecordBatch.from_arrays(
        [
            pa.array(ids),
            pa.array(["synthetic"] * n),
            pa.array(["h"] * n),
            pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1)), DIM),
        ],
        schema=EMBEDDINGS_SCHEMA(DIM),
    )


def make_table(path, vectors: np.ndarray):
    bank = Bank(str(path))
    bank.write("embeddings", EMBEDDINGS_SCHEMA(DIM), [rows(vectors)], {"embedder": "synthetic"})
    return bank.table("embeddings")


def queries(vectors: np.ndarray, n: int = 200, seed: int = 1) -> np.ndarray:
    """Stored vectors moved by noise (cosine ~0.85 to their source, like a paraphrase)."""
    rng = np.random.default_rng(seed)
    base = vectors[rng.choice(len(vectors), n, replace=False)]
    return unit(base + 0.6 * unit(rng.normal(size=base.shape))).astype(np.float32)


@pytest.fixture(scope="module")
def vectors() -> np.ndarray:
    return embedding_like(N)


@pytest.fixture
def table(tmp_path, vectors):
    return make_table(tmp_path / "bank", vectors)


def test_below_threshold_no_index_and_exact(table, vectors):
    report = build_index(table, threshold=10_000)
    assert report["index"] is None and "exact" in report["reason"] and not has_index(table)
    q = queries(vectors, 20)
    truth, _ = exact_topk(table, q, k=5)
    for got in (search(table, q, k=5), search(table, q, k=5, exact=True)):
        assert [[rid for rid, _ in hits] for hits in got] == [[rid for rid, _ in hits] for hits in truth]
        for hits, want in zip(got, truth):
            np.testing.assert_allclose([s for _, s in hits], [s for _, s in want], atol=1e-5)


def test_scores_are_cosine_similarities(table, vectors):
    hits = search(table, vectors[[10, 20]], k=5)
    assert [h[0][0] for h in hits] == ["ref-00010", "ref-00020"]
    for h in hits:
        assert h[0][1] == pytest.approx(1.0, abs=1e-5)
        scores = [s for _, s in h]
        assert scores == sorted(scores, reverse=True) and all(-1.0 <= s <= 1.0 + 1e-6 for s in scores)
    # the score is the similarity itself, not LanceDB's distance (1 - cos)
    rid, score = hits[1][3]
    assert score == pytest.approx(float(vectors[20] @ vectors[int(rid.split("-")[1])]), abs=1e-5)


@pytest.mark.parametrize("index_type", ["IVF_HNSW_SQ", "IVF_PQ"])
def test_ann_index_recall_at_5(table, vectors, index_type):
    report = build_index(table, threshold=1_000, index_type=index_type)
    assert report["index"] == index_type and report["rows"] == N
    info = index_info(table)
    assert info["index_type"] == index_type and info["indexed_rows"] == N
    q = queries(vectors)
    assert recall_at_k(table, q, k=5) >= 0.9
    # batched and one-at-a-time queries give the same answers
    batched = search(table, q[:8], k=5)
    assert [search(table, q[i], k=5)[0] for i in range(8)] == batched
    # exact=True ignores the index
    truth, _ = exact_topk(table, q[:8], k=5)
    assert [[r for r, _ in h] for h in search(table, q[:8], k=5, exact=True)] == [[r for r, _ in h] for h in truth]


def test_index_dropped_when_table_falls_below_threshold(table):
    build_index(table, threshold=1_000)
    assert has_index(table)
    assert build_index(table, threshold=1_000_000)["index"] is None
    assert not has_index(table)


def test_rows_added_after_the_build_are_found(table):
    build_index(table, threshold=1_000)
    new = embedding_like(5, seed=99)
    table.add(pa.Table.from_batches([rows(new, start=N)]))
    assert index_info(table)["unindexed_rows"] == 5
    assert search(table, new[2], k=1)[0][0][0] == f"ref-{N + 2:05d}"


def test_ties_count_as_hits(tmp_path):
    # every vector three times: which copy a search returns is arbitrary, recall must not care
    base = embedding_like(300, seed=5)
    table = make_table(tmp_path / "bank", np.repeat(base, 3, axis=0))
    assert recall_at_k(table, queries(base, 50), k=5) == 1.0


def test_bad_inputs(table):
    with pytest.raises(ValueError, match="dim 384"):
        search(table, np.ones((2, 8), dtype=np.float32))
    with pytest.raises(ValueError, match="k must be positive"):
        search(table, np.ones(DIM, dtype=np.float32), k=0)
    assert search(table, np.zeros((0, DIM), dtype=np.float32)) == []
    with pytest.raises(VectorIndexError, match="unknown index type"):
        AnnParams.for_table(5000, DIM, "HNSW_MAGIC")
