"""The retrieval path of decoding (jobs/inference/retriever.py) on a real bank (FOLDOC refs, the
static embedder, LanceDB with an ANN index, memories of a random-weight tiny model): the in-RAM
exact search agrees with LanceDB's exact search, the batched eq. 6 filter keeps what the
per-row filter kept, reference tokens are cached, and greedy decoding reads the same memories
either way."""

from __future__ import annotations

import pytest

from jobs.inference.engine import Inference
from jobs.inference.retriever import BankRetriever
from jobs.stages.encode import run_encode
from model.generation import generate_with_memory
from pipelines.overlap import overlap_many
from storage.bank import Bank
from storage.lexical import LexicalIndexError
from storage.vectors import search
from tests.conftest import small_embedded_bank
from tests.jobs.inference.test_generate import TINY
from tests.storage.test_vector_matrix import same_ranking

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def inf(tmp_path_factory, ray_local):
    cfg, _, _ = small_embedded_bank(tmp_path_factory.mktemp("ret"), *TINY)
    run_encode(cfg)
    return Inference(cfg)


def lance_twin(r: BankRetriever, **kw) -> BankRetriever:
    """The same retriever searching through LanceDB (its own caches)."""
    args = dict(
        per_query=r.per_query,
        store=r.store,
        max_overlap=r.max_overlap,
        candidates=r.candidates,
        exact=True,
        ram_search_bytes=0,
    )
    return BankRetriever(r.bank, r.embedder, r.tokenizer, **{**args, **kw})


def ref_queries(inf, n=12, width=48):
    rows = inf.bank.dataset("refs").to_table(columns=["token_ids"]).column("token_ids").to_pylist()
    rows = [t for t in rows if len(t) >= width][:n]
    return [t[:width] for t in rows], rows


def test_ram_search_equals_lancedb_exact_search(inf):
    r = inf.retriever()
    assert r.matrix() is not None and len(r.matrix()) == r.table.count_rows()
    assert lance_twin(r).matrix() is None
    queries, _ = ref_queries(inf)
    vectors = r.embedder.embed([r.tokenizer.decode(q) for q in queries])
    for ram, lance in zip(r.matrix().search(vectors, k=10), search(r.table, vectors, k=10, exact=True)):
        same_ranking(ram, lance)


def test_batched_filter_keeps_what_the_per_row_filter_kept(inf):
    r = lance_twin(inf.retriever(), exact=False)  # the ANN candidates, as before this path existed
    queries, contexts = ref_queries(inf)
    contexts = [c[: 40 + 7 * i] for i, c in enumerate(contexts)]  # texts of different lengths
    got = r.search_ids(queries, contexts)
    vectors = r.embedder.embed([r.tokenizer.decode(q) for q in queries])
    hits = search(r.table, vectors, k=r.candidates, exact=False, params=r.params)
    tokens = r.ref_tokens({rid for h in hits for rid, _ in h})
    expected = []
    for h, text in zip(hits, contexts):
        ids = [rid for rid, _ in h]
        over = overlap_many(text, [tokens[i] for i in ids])
        expected.append([i for i, o in zip(ids, over) if o <= r.max_overlap][: r.per_query])
    assert got == expected
    # the filter did drop some (a query's own reference: its context contains it)
    assert any(row != [rid for rid, _ in h][: len(row)] for row, h in zip(got, hits))


def test_reference_tokens_are_cached(inf):
    r = lance_twin(inf.retriever(), exact=False)
    queries, contexts = ref_queries(inf, n=4)
    r.search_ids(queries, contexts)
    scans = r.counts["refs"]
    again = r.search_ids(queries, contexts)
    assert r.counts["refs"] == scans  # every candidate's tokens from the cache
    r.clear_cache()
    assert r.search_ids(queries, contexts) == again and r.counts["refs"] == scans + 1
    table = Bank(inf.bank.uri).dataset("refs").to_table(columns=["ref_id", "token_ids"]).to_pylist()
    truth = {row["ref_id"]: row["token_ids"] for row in table}
    got = r.ref_tokens(list(truth)[:5])
    assert got == {k: truth[k] for k in list(truth)[:5]} and all(type(v) is list for v in got.values())
    bounded = lance_twin(r, token_cache=3)
    bounded.search_ids(queries, contexts)
    assert len(bounded._shared["tokens"]) == 3
    uncached = lance_twin(r, token_cache=0)
    uncached.search_ids(queries, contexts)
    uncached.search_ids(queries, contexts)
    assert uncached.counts["refs"] == 2 and not uncached._shared["tokens"]


def test_greedy_decoding_reads_the_same_memories(inf):
    r = inf.memory_retriever()
    twin = lance_twin(r)
    queries, _ = ref_queries(inf, n=3, width=inf.model.config.mem_chunk_size + 5)
    batch = inf._batch(queries, 3 * inf.model.config.mem_chunk_size)
    n_new = 3 * inf.model.config.mem_chunk_size
    ram = generate_with_memory(inf.model, batch, n_new, r, prefetch=True)
    lance = generate_with_memory(inf.model, batch, n_new, twin, prefetch=False)
    assert ram.tokens.tolist() == lance.tokens.tolist()
    assert [[c.ref_ids for c in row] for row in ram.reads] == [[c.ref_ids for c in row] for row in lance.reads]


def test_memories_of_short_rows_leave_empty_slots(inf):
    r = inf.memory_retriever()
    M = r.per_query
    ids = inf.bank.dataset("refs").to_table(columns=["ref_id"]).column("ref_id").to_pylist()[: M + 2]
    rows = [ids[: M - 1], [], [ids[M]], ids[:1] + ids[M + 1 : M + 2]]
    mems, mask = r.memories(rows)
    assert mems.shape[:2] == (4, M) and mask.shape[:2] == (4, M)
    for n, row in enumerate(rows):
        if row:
            want, want_mask = r.store.fetch(row)
            assert (mems[n, : len(row)] == want).all() and (mask[n, : len(row)] == want_mask).all()
        assert not mask[n, len(row) :].any() and not mems[n, len(row) :].any()
    full, full_mask = r.memories([ids[:M], ids[1 : M + 1]])  # no empty slot: the fetched batch
    want, want_mask = r.store.fetch(ids[:M] + ids[1 : M + 1])
    assert (full.flatten(0, 1) == want).all() and (full_mask.flatten(0, 1) == want_mask).all()


# -- retrieval.method bm25 / hybrid at serving (storage/lexical.py): the ranking pairing used


def facts_retriever(cfg, method: str, **kw) -> BankRetriever:
    from dataclasses import replace

    from jobs.inference.engine import bank_retriever, bank_tokenizer

    bank = Bank(cfg.bank.uri)
    return bank_retriever(
        replace(cfg, retrieval=replace(cfg.retrieval, method=method)), bank, bank_tokenizer(bank), per_query=3, **kw
    )


def entity_of(bank: Bank, ref_ids: list[str]) -> list[str | None]:
    """The corpus record (the facts entity) each reference comes from."""
    t = bank.dataset("documents").to_table(columns=["doc_id", "source_id"])
    source = dict(zip(t.column("doc_id").to_pylist(), t.column("source_id").to_pylist()))
    return [source.get(r.rsplit("-", 1)[0]) for r in ref_ids]


def test_serving_with_bm25_retrieves_the_entity_a_query_names(facts_bm25_bank):
    cfg, names = facts_bm25_bank
    r = facts_retriever(cfg, "bm25")
    assert r.method == "bm25"
    entities = list(names)[:12]
    queries = [
        r.tokenizer.encode(f"Where was {names[e]} born, and what is {names[e]} known for?").ids for e in entities
    ]
    got = r.search_ids(queries)
    assert r.counts["embed"] == 0 and r.counts["search"] == 1  # BM25 embeds nothing
    assert entity_of(r.bank, [row[0] for row in got]) == entities
    assert all(1 <= len(row) <= r.per_query for row in got)
    hybrid = facts_retriever(cfg, "hybrid")
    fused = hybrid.search_ids(queries)
    assert hybrid.counts["embed"] == 1  # one embedder call for every query, as vector serving
    assert sum(e == want for e, want in zip(entity_of(r.bank, [row[0] for row in fused]), entities)) >= 10


def test_serving_a_bank_without_the_full_text_index_is_refused_at_once(inf):
    with pytest.raises(LexicalIndexError, match="retrieval.method 'bm25'.*run `m3 embed`"):
        BankRetriever(inf.bank, inf.retriever().embedder, inf.tokenizer, per_query=2, method="bm25")
