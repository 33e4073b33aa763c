"""Lexical retrieval: BM25 over the references' text (LanceDB's native full-text index), its
fusion with vector search, and `retrieve`, the one call every retriever goes through.

    hits = retrieve("hybrid", texts, k, table=bank.table("embeddings"), vector_hits=dense)

`retrieval.method` (jobs/config) picks the ranking:
- vector: cosine over the embedder's vectors (storage/vectors.py), scores are similarities;
- bm25:   LanceDB's inverted index on the `text` column the embed stage stores beside the
          vectors; scores are BM25 (unbounded, > 0, comparable only within one query);
- hybrid: reciprocal-rank fusion of the two top-k lists, scores sum(1 / (RRF_K + rank)).

Why lexical at all: a static word-piece embedding splits an invented or rare name (the facts
corpus' entities, identifiers, product codes) into common pieces, so the vector of "Riaxsteirt
Grultrik" is mostly the vector of unrelated words; an inverted index matches the name itself
(BENCHMARKS.md, "Lexical retrieval for pairing": on the facts corpus the chunk's rank-0
reference describes an entity the chunk names for 39.6 % of chunks by vector, 90.4 % by bm25,
48.0 % by hybrid: fusion helps only where both lists carry signal, and here the vector list's
is mostly noise).

Hybrid fuses the two lists each k deep (the caller's k: no deeper vector search, whose HNSW
`ef` bounds k); a document in one list only ties with one at the same rank in the other, and
ties go to the vector list's (hybrid is vector search helped by BM25, not the reverse).

Why the index lives on the `embeddings` table and not on `refs`: an index is a commit of its
own, and every stage, key and publish check names the refs version its tables were built from
(jobs/ops/publish.py `built_from`); a commit on refs by the embed stage would move that version
under them. The embeddings table is already the embed stage's output, rewritten whole by every
build and followed by its index commit (the vector one), which is the version published; the
full-text index rides in the same place, so a pinned build searches the index of its own
version. Lance drops a table's indexes when the table is overwritten (Bank.write), keeps them
on a checked-out old version, remaps them on compaction (`compact_files`), and flat-searches
rows appended after the index (none here: the stage rewrites the table and indexes it again).
"""

from __future__ import annotations

from typing import Callable, Sequence

from model.errors import M3Error

METHODS = ("vector", "bm25", "hybrid")
TEXT_COLUMN = "text"
ID_COLUMN = "ref_id"
# The usual RRF constant (Cormack et al. 2009): dampens the head so that a document ranked well
# by both lists beats one ranked first by only one.
RRF_K = 60
# The full-text index, spelled out rather than left to LanceDB's defaults (which may change
# between releases): these are in the embed stage's key, so a change re-indexes.
FTS_PARAMS = {
    "base_tokenizer": "simple",
    "language": "English",
    "lower_case": True,
    "stem": True,
    "remove_stop_words": True,
    "ascii_folding": True,
    "max_token_length": 40,
    "with_position": False,
}

Hits = list[list[tuple[str, float]]]


class LexicalIndexError(M3Error, RuntimeError):
    pass


def check_method(method: str) -> None:
    if method not in METHODS:
        raise ValueError(f"retrieval method must be one of {', '.join(repr(m) for m in METHODS)}, got {method!r}")


def uses_text(method: str) -> bool:
    """Whether the method reads the full-text index (bm25, hybrid)."""
    check_method(method)
    return method != "vector"


def uses_vectors(method: str) -> bool:
    """Whether the method embeds its queries (vector, hybrid)."""
    check_method(method)
    return method != "bm25"


def clean_query(text: str) -> str:
    """The query as plain words: every non-alphanumeric character becomes a space, so nothing in
    it is read as query syntax (quotes, +, -, :, parentheses) and the index's own tokenizer sees
    the words the references were indexed by."""
    return " ".join("".join(c if c.isalnum() else " " for c in text).split())


def fts_info(table) -> dict | None:
    """{"name", "indexed_rows", "unindexed_rows"} of the table's full-text index on `text`, or None."""
    for idx in table.list_indices():
        if str(idx.index_type).upper() in ("FTS", "INVERTED") and list(idx.columns) == [TEXT_COLUMN]:
            st = table.index_stats(idx.name)
            return {"name": idx.name, "indexed_rows": st.num_indexed_rows, "unindexed_rows": st.num_unindexed_rows}
    return None


def build_fts_index(table) -> dict:
    """(Re)build the full-text index on the table's `text` column: one commit. Returns what was
    built, for the stage's report and lineage."""
    from lancedb.index import FTS

    if TEXT_COLUMN not in table.schema.names:
        raise LexicalIndexError(f"the table has no {TEXT_COLUMN!r} column to index")
    table.create_index(TEXT_COLUMN, config=FTS(**FTS_PARAMS), replace=True)
    info = fts_info(table) or {}
    return {"index": "FTS", "column": TEXT_COLUMN, "rows": info.get("indexed_rows"), **FTS_PARAMS}


def require_fts(table, method: str, what: str = "embeddings") -> None:
    """A LexicalIndexError naming the fix when `method` needs a full-text index the table lacks."""
    if uses_text(method) and fts_info(table) is None:
        raise LexicalIndexError(
            f"retrieval.method {method!r} searches the full-text index of the {what} table, and "
            f"this version (v{table.version}) has none: it was built for retrieval.method "
            f"'vector'; run `m3 embed` (or `m3 rebuild`) with retrieval.method {method!r}"
        )


def bm25_search(table, texts: Sequence[str], k: int, among: Sequence[Sequence[str]] | None = None) -> Hits:
    """Top-k references by BM25 for each query text: [[(ref_id, score), ...], ...], best first
    (ties by ref_id). A query with no indexed word has no hits. among[i]: search only these
    references for query i (BM25 statistics stay those of the whole table)."""
    if k <= 0:
        raise ValueError(f"k must be positive, got {k}")
    out: Hits = []
    for i, text in enumerate(texts):
        q = clean_query(text)
        ids = list(among[i]) if among is not None else None
        if not q or ids == []:
            out.append([])
            continue
        builder = table.search(q, query_type="fts", fts_columns=TEXT_COLUMN)
        if ids is not None:
            quoted = ", ".join("'" + r.replace("'", "''") + "'" for r in ids)
            builder = builder.where(f"{ID_COLUMN} IN ({quoted})", prefilter=True)
        res = builder.limit(k).select([ID_COLUMN, "_score"]).to_arrow()
        hits = [(r, float(s)) for r, s in zip(res.column(ID_COLUMN).to_pylist(), res.column("_score").to_pylist())]
        hits.sort(key=lambda h: (-h[1], h[0]))
        out.append(hits)
    return out


def rrf(lists: Sequence[Sequence[tuple[str, float]]], k: int, c: int = RRF_K) -> list[tuple[str, float]]:
    """Reciprocal-rank fusion of ranked lists: score(d) = sum over lists of 1 / (c + rank of d),
    rank from 1. Why ranks and not scores: a cosine similarity (in [-1, 1]) and a BM25 score
    (unbounded, its scale set by the query's length and the corpus' term statistics) are not on
    one scale, and normalizing either per query is a guess; RRF needs only the order. Ties go to
    the document met first walking the lists rank by rank (the first list first)."""
    score: dict[str, float] = {}
    first: dict[str, int] = {}
    for rank in range(max((len(x) for x in lists), default=0)):
        for lst in lists:
            if rank < len(lst):
                rid = lst[rank][0]
                score[rid] = score.get(rid, 0.0) + 1.0 / (c + rank + 1)
                first.setdefault(rid, len(first))
    return sorted(score.items(), key=lambda kv: (-kv[1], first[kv[0]]))[:k]


def retrieve(
    method: str,
    texts: Sequence[str],
    k: int,
    *,
    table,
    vector_hits: Callable[[list[str], int], Hits] | None = None,
    among: Sequence[Sequence[str]] | None = None,
) -> Hits:
    """The top-k references of each query text by `method`, best first: the one entry point of
    the pair stage, serving (BankRetriever), `m3 search` and the QA probe's oracle order.

    table: the (pinned) `embeddings` table, whose full-text index bm25 and hybrid search;
    vector_hits(texts, k): the caller's vector search (its embedder, its in-RAM matrix or
    LanceDB index), called only by vector and hybrid, with every text at once; among: restrict
    the lexical search of query i to these references (the caller restricts its vector search
    itself)."""
    check_method(method)
    texts = list(texts)
    if method == "vector":
        return vector_hits(texts, k)
    lexical = bm25_search(table, texts, k, among)
    if method == "bm25":
        return lexical
    dense = vector_hits(texts, k)
    return [rrf([d, lx], k) for d, lx in zip(dense, lexical)]
