"""In-RAM exact search (storage/vector_matrix.py) against LanceDB's exact search on the same table:
same ids in the same order (where no two candidates are within float rounding of each other),
same similarities within float tolerance, and the size cap."""

from __future__ import annotations

import numpy as np
import pytest

from storage.vector_matrix import VectorMatrix
from storage.vectors import search
from tests.storage.test_vectors import DIM, embedding_like, make_table, queries, unit


@pytest.fixture(scope="module")
def vectors() -> np.ndarray:
    return embedding_like(1500, seed=5)


@pytest.fixture
def table(tmp_path, vectors):
    return make_table(tmp_path / "bank", vectors)


def same_ranking(a, b, tol=1e-5):
    """Equal id lists, except that neighbours whose similarities are within tol may swap."""
    assert len(a) == len(b)
    for (ra, sa), (rb, sb) in zip(a, b):
        assert sa == pytest.approx(sb, abs=tol)
        if ra != rb:
            assert abs(sa - sb) <= tol, (ra, rb)


def test_equals_lancedb_exact_search(table, vectors):
    m = VectorMatrix.load(table)
    assert m is not None and len(m) == len(vectors)
    q = queries(vectors, n=60, seed=7)
    for k in (1, 5, 10):
        lance = search(table, q, k=k, exact=True)
        ram = m.search(q, k=k)
        for a, b in zip(ram, lance):
            same_ranking(a, b)


def test_scores_are_cosines_of_unnormalized_queries(table, vectors):
    m = VectorMatrix.load(table)
    q = 3.0 * queries(vectors, n=4, seed=8)  # search normalizes queries
    for hits, qi in zip(m.search(q, k=3), unit(q)):
        sims = [s for _, s in hits]
        assert sims == sorted(sims, reverse=True)
        for rid, s in hits:
            assert s == pytest.approx(float(vectors[int(rid.split("-")[1])] @ qi), abs=1e-5)


def test_stored_vector_finds_itself(table, vectors):
    m = VectorMatrix.load(table)
    hits = m.search(vectors[[3, 700, 1499]], k=1)
    assert [h[0][0] for h in hits] == ["ref-00003", "ref-00700", "ref-01499"]


def test_k_larger_than_table_and_empty_queries(tmp_path):
    v = embedding_like(4, seed=9)
    m = VectorMatrix.load(make_table(tmp_path / "small", v))
    hits = m.search(v[:2], k=10)
    assert [len(h) for h in hits] == [4, 4]
    assert m.search(np.zeros((0, DIM), np.float32), k=3) == []
    with pytest.raises(ValueError):
        m.search(v[:1], k=0)
    with pytest.raises(ValueError):
        m.search(np.ones((1, DIM + 1), np.float32), k=1)


def test_size_cap(table, vectors):
    need = len(vectors) * DIM * 4
    assert VectorMatrix.nbytes(table) == need
    assert VectorMatrix.load(table, max_bytes=need - 1) is None
    assert VectorMatrix.load(table, max_bytes=need) is not None
