"""Lexical retrieval (storage/lexical.py) on a real LanceDB table of a tiny made-up corpus, embedded
by the default static embedder: BM25 finds a reference by an invented name whose word pieces
make the vector search prefer another, hybrid fusion keeps what either list ranked, the
`among` restriction, and a table without the full-text index refused with the fix named."""

from __future__ import annotations

import numpy as np
import pytest

from pipelines.embed_step import EMBEDDINGS_SCHEMA, EmbedRefs, to_arrow
from storage.bank import Bank
from storage.lexical import (
    RRF_K,
    LexicalIndexError,
    bm25_search,
    build_fts_index,
    clean_query,
    fts_info,
    require_fts,
    retrieve,
    rrf,
)
from storage.vectors import search

# "Sumthe Munkrai" is named by one reference; two others have names built of the same word
# pieces (Sumthel Munkraith, Sumthem Munkras) and the query's own words (where, born)
REFS = {
    "sumthe-0": "Born in Kriasu in 1631, Sumthe Munkrai worked as a cartographer and was known to play the harp.",
    "sailor-0": "Where was the sailor Sumthem Munkras born? He was born at sea, off the coast of Drou.",
    "weaver-0": "Sumthel Munkraith was born in Drou, and where he was born everyone is born a weaver.",
    "town-0": "Founded in 1672, the town of Gykbru lies in the lowlands on the river Geherro.",
    "lute-0": "The lute is a plucked string instrument with a deep round back and a short neck.",
}
QUERY = "Where was Sumthe Munkrai born?"


@pytest.fixture(scope="module")
def table(tmp_path_factory):
    ids = sorted(REFS)
    step = EmbedRefs("static-minilm", text=True)
    out = step(
        {
            "ref_id": np.asarray(ids, dtype=object),
            "text": np.asarray([REFS[i] for i in ids], dtype=object),
            "content_hash": np.asarray(ids, dtype=object),
        }
    )
    bank = Bank(str(tmp_path_factory.mktemp("lexical")))
    bank.write(
        "embeddings",
        EMBEDDINGS_SCHEMA(step.dim, text=True),
        [to_arrow(out, step.dim, text=True)],
        {"embedder": step.embedder.lineage()},
    )
    t = bank.table("embeddings")
    before = t.version
    report = build_fts_index(t)
    assert t.version == before + 1 and report["rows"] == len(REFS)  # one commit of its own
    return t, step.embedder


def dense(table, embedder):
    return lambda texts, k: search(table, embedder.embed(texts), k=k, exact=True)


def test_bm25_finds_an_invented_name_the_vector_search_misses(table):
    t, embedder = table
    vector = retrieve("vector", [QUERY], 5, table=t, vector_hits=dense(t, embedder))[0]
    bm25 = retrieve("bm25", [QUERY], 5, table=t)[0]
    assert vector[0][0] != "sumthe-0"  # the word pieces of the look-alike names win
    assert bm25[0][0] == "sumthe-0"  # the name itself, a rare word, wins
    assert bm25[0][1] > 2 * bm25[1][1]
    assert [s for _, s in bm25] == sorted((s for _, s in bm25), reverse=True)
    assert "lute-0" not in {r for r, _ in bm25}  # shares no word with the query


def test_hybrid_keeps_the_best_of_either_list(table):
    t, embedder = table
    top_vector = retrieve("vector", [QUERY], 1, table=t, vector_hits=dense(t, embedder))[0][0][0]
    fused = retrieve("hybrid", [QUERY], 2, table=t, vector_hits=dense(t, embedder))[0]
    assert {r for r, _ in fused} == {top_vector, "sumthe-0"}
    assert all(0 < s <= 2 / (RRF_K + 1) for _, s in fused)


def test_rrf_sums_reciprocal_ranks_over_the_lists():
    a = [("x", 0.9), ("y", 0.8), ("z", 0.1)]
    b = [("w", 12.0), ("y", 3.0)]
    fused = rrf([a, b], k=10)
    assert [r for r, _ in fused] == ["y", "x", "w", "z"]  # y: in both lists; x before w: the first list's
    assert fused[0][1] == pytest.approx(1 / (RRF_K + 2) + 1 / (RRF_K + 2))
    assert fused[-1][1] == pytest.approx(1 / (RRF_K + 3))  # z: only in one list, at rank 3
    assert rrf([a, b], k=2) == fused[:2] and rrf([[], []], k=3) == []


def test_among_restricts_the_search_with_the_tables_statistics(table):
    t, _ = table
    whole = dict(bm25_search(t, [QUERY], 5)[0])
    got = bm25_search(t, [QUERY, QUERY, QUERY], 5, among=[["weaver-0", "lute-0"], [], ["sumthe-0"]])
    assert [r for r, _ in got[0]] == ["weaver-0"] and got[1] == []
    assert got[2] == [("sumthe-0", pytest.approx(whole["sumthe-0"]))]


def test_query_syntax_is_read_as_words(table):
    t, _ = table
    assert clean_query('born:"Sumthe" (Munkrai)+ -x') == "born Sumthe Munkrai x"
    assert bm25_search(t, ['"Sumthe" AND (Munkrai:', "", "?!"], 3)[0][0][0] == "sumthe-0"
    assert bm25_search(t, ["?!"], 3) == [[]]


def test_a_table_without_the_index_is_refused_naming_the_fix(tmp_path):
    bank = Bank(str(tmp_path))
    step = EmbedRefs("static-minilm")
    out = step(
        {
            "ref_id": np.asarray(["a-0"], dtype=object),
            "text": np.asarray(["some text"], dtype=object),
            "content_hash": np.asarray(["h"], dtype=object),
        }
    )
    bank.write("embeddings", EMBEDDINGS_SCHEMA(step.dim), [to_arrow(out, step.dim)], {})
    t = bank.table("embeddings")
    assert fts_info(t) is None
    require_fts(t, "vector")  # needs none
    for method in ("bm25", "hybrid"):
        with pytest.raises(LexicalIndexError, match=f"retrieval.method '{method}'.*run `m3 embed`"):
            require_fts(t, method)
    with pytest.raises(LexicalIndexError, match="no 'text' column"):
        build_fts_index(t)
    with pytest.raises(ValueError, match="one of 'vector', 'bm25', 'hybrid'"):
        retrieve("bm26", ["x"], 1, table=t)
