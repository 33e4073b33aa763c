"""The embed job end to end, `m3 search` over its table, and its index the same for the same
vectors."""

from __future__ import annotations

import dataclasses

import numpy as np
import pyarrow as pa
import pytest

from jobs.cli.main import main
from jobs.config import load_config
from jobs.stages.embed import build_reproducible_index, reproducible, run_embed, search_text
from pipelines.embed_step import EMBEDDINGS_SCHEMA
from pipelines.embedder import load_embedder
from storage.bank import Bank, BankError
from storage.lexical import LexicalIndexError, fts_info
from storage.vectors import build_index, has_index, index_info, search
from tests.conftest import small_embedded_bank, small_facts_bank

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def embedded(tmp_path_factory, ray_local):
    cfg, overrides, summary = small_embedded_bank(tmp_path_factory.mktemp("embed"))
    return cfg, summary, overrides


def test_every_reference_gets_a_unit_vector_and_an_index(embedded):
    cfg, summary, _ = embedded
    bank = Bank(cfg.bank.uri)
    refs = bank.dataset("refs").to_table(columns=["ref_id", "content_hash"]).to_pylist()
    rows = bank.dataset("embeddings").to_table().to_pylist()
    assert sorted((r["ref_id"], r["content_hash"]) for r in refs) == sorted(
        (r["ref_id"], r["content_hash"]) for r in rows
    )
    assert all(abs(sum(v * v for v in r["vector"]) - 1) < 1e-4 for r in rows)
    meta = bank.metadata("embeddings")
    assert meta["embedder"]["embedder"] == load_embedder(cfg.retrieval.embedder).id == rows[0]["embedder"]
    assert summary["index"]["index"] == "IVF_HNSW_SQ" and has_index(bank.table("embeddings"))  # past the threshold
    # the stage's tag names its data commit; the summary names the version after the index's own
    # commit, the one a publish names (f648c26: a rebuild publishes exactly what it built)
    tags = bank.tags("embeddings")
    assert list(tags) == [f"embed-{meta['embed_key']}"]
    assert tags[f"embed-{meta['embed_key']}"] < summary["version"] == bank.table("embeddings").version


def test_search_finds_the_reference_a_query_paraphrases(embedded):
    cfg, _, _ = embedded
    bank = Bank(cfg.bank.uri)
    ref = bank.dataset("refs").to_table(columns=["ref_id", "text"]).to_pylist()[7]
    query = " ".join(ref["text"].split()[:40])  # the start of the reference, as a reader would quote it
    for exact in (False, True):
        hits = search_text(cfg, query, k=5, exact=exact)
        assert ref["ref_id"] in [h["ref_id"] for h in hits]
        assert [h["rank"] for h in hits] == [1, 2, 3, 4, 5]
        assert all(-1 <= h["score"] <= 1 for h in hits) and hits[0]["score"] >= hits[-1]["score"]


def test_rerun_is_a_noop_and_cli_search_prints_hits(embedded, capsys):
    cfg, summary, overrides = embedded
    assert run_embed(cfg)["status"] == "up_to_date"
    assert "nothing to do" in capsys.readouterr().out
    args = ["search", "-c", "configs/demo.yaml", "-k", "3"]
    for o in overrides:
        args += ["--set", o]
    assert main([*args, "computer memory"]) == 0
    out = capsys.readouterr().out
    assert out.count("\n") >= 3 and out.lstrip().startswith("1. [")


def test_an_edit_of_a_few_references_indexes_only_their_vectors(embedded, tmp_path):
    # the stage's commit keeps the index (an Update: jobs/stages/runner.py), so the index gets a
    # delta over the recomputed vectors (storage.vectors.update_index), the old segment shared
    import shutil

    import lance

    from storage.vectors import index_segments

    cfg, _, _ = embedded
    shutil.copytree(cfg.bank.uri, tmp_path / "bank")
    cfg = dataclasses.replace(cfg, bank=dataclasses.replace(cfg.bank, uri=str(tmp_path / "bank")))
    bank = Bank(cfg.bank.uri)
    n, before = bank.table("embeddings").count_rows(), index_segments(bank.table("embeddings"))
    refs = bank.dataset("refs")
    quoted = ", ".join(f"'{r}'" for r in refs.to_table(columns=["ref_id"]).column("ref_id").to_pylist()[:3])
    lance.dataset(refs.uri).update(
        {"text": "'an edited reference about compilers'", "content_hash": "'edited-' || content_hash"},
        where=f"ref_id IN ({quoted})",
    )
    out = run_embed(cfg)
    assert out["status"] == "built" and out["computed"] == 3
    assert out["index"]["update"] == "incremental" and out["index"]["indexed_rows"] == 3, out["index"]
    table = bank.table("embeddings")
    assert out["version"] == table.version and table.count_rows() == n
    assert index_info(table)["unindexed_rows"] == 0 and index_info(table)["indexed_rows"] == n
    segments = index_segments(table)
    assert [s["uuid"] for s in segments[:-1]] == [s["uuid"] for s in before] and segments[-1]["rows"] == 3


def test_search_needs_embeddings(tmp_path):
    cfg = load_config("configs/demo.yaml", [f"bank.uri={tmp_path}"])
    with pytest.raises(BankError, match="no embeddings table: run `m3 embed` first"):
        search_text(cfg, "x")


def _random_embeddings(uri: str, n: int, dim: int, seed: int = 0) -> np.ndarray:
    """An `embeddings` table of n random unit vectors: hard for HNSW (no clusters), so two graphs
    that differ answer some queries differently."""
    rng = np.random.default_rng(seed)
    v = rng.standard_normal((n, dim)).astype(np.float32)
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    schema = EMBEDDINGS_SCHEMA(dim)
    batch = pa.RecordBatch.from_arrays(
        [
            pa.array([f"r{i}" for i in range(n)]),
            pa.array(["e"] * n),
            pa.array(["h"] * n),
            pa.FixedSizeListArray.from_arrays(pa.array(v.reshape(-1), pa.float32()), dim),
        ],
        schema=schema,
    )
    Bank(uri).write("embeddings", schema, [batch], {})
    return rng.standard_normal((400, dim)).astype(np.float32)


def test_the_index_is_the_same_for_the_same_vectors(tmp_path):
    # Two in-process builds of this table (LanceDB's parallel HNSW insertion) answered 2 and 5 of
    # 200 queries differently when measured; the one-thread child's builds answer all alike.
    uri = str(tmp_path / "bank")
    queries = _random_embeddings(uri, 3000, 32)
    answers = []
    for _ in range(2):
        report = build_reproducible_index(Bank(uri), "embeddings", 3000, 1000, "IVF_HNSW_SQ")
        assert report["index"] == "IVF_HNSW_SQ" and report["reproducible"]
        table = Bank(uri).table("embeddings")
        assert index_info(table)["indexed_rows"] == 3000
        answers.append([[rid for rid, _ in hits] for hits in search(table, queries, k=8)])
    assert answers[0] == answers[1]


def test_the_incremental_index_is_the_same_for_the_same_commit(tmp_path):
    # the delta index (storage.vectors.update_index) built twice, in the one-thread child, from
    # the same previous index and the same commit (Lance's delete + append, as the stage's Update)
    import shutil

    import lance

    uri = str(tmp_path / "bank")
    queries = _random_embeddings(uri, 3000, 32)
    assert build_reproducible_index(Bank(uri), "embeddings", 3000, 1000, "IVF_HNSW_SQ")["index"] == "IVF_HNSW_SQ"
    ds_uri = Bank(uri).dataset("embeddings").uri
    lance.dataset(ds_uri).delete("ref_id IN (" + ", ".join(f"'r{i}'" for i in range(0, 2500, 5)) + ")")
    rng = np.random.default_rng(7)
    v = rng.standard_normal((700, 32)).astype(np.float32)
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    new = pa.table(
        {
            "ref_id": [f"n{i}" for i in range(700)],
            "embedder": ["e"] * 700,
            "content_hash": ["h"] * 700,
            "vector": pa.FixedSizeListArray.from_arrays(pa.array(v.reshape(-1), pa.float32()), 32),
        },
        schema=lance.dataset(ds_uri).schema,
    )
    lance.write_dataset(new, ds_uri, mode="append")
    shutil.copytree(uri, tmp_path / "copy")
    answers = []
    for u in (uri, str(tmp_path / "copy")):
        report = build_reproducible_index(Bank(u), "embeddings", 3200, 1000, "IVF_HNSW_SQ", incremental=True)
        assert report["update"] == "incremental" and report["indexed_rows"] == 700 and report["reproducible"]
        table = Bank(u).table("embeddings")
        assert index_info(table)["unindexed_rows"] == 0
        answers.append([[rid for rid, _ in hits] for hits in search(table, np.concatenate([queries, v[:100]]), k=8)])
    assert answers[0] == answers[1]


def test_what_cannot_be_reproduced_says_so(tmp_path):
    uri = str(tmp_path / "bank")
    _random_embeddings(uri, 300, 16)
    assert build_reproducible_index(Bank(uri), "embeddings", 300, 1000, "IVF_HNSW_SQ") == {
        **build_index(Bank(uri).table("embeddings"), 300, threshold=1000),
        "reproducible": True,
    }  # exact: no index
    report = build_reproducible_index(Bank(uri), "embeddings", 300, 100, "IVF_PQ")  # k-means: unseeded in LanceDB
    assert report["index"] == "IVF_PQ" and not report["reproducible"]
    assert not reproducible(2_000_000, 100, "IVF_HNSW_SQ")  # two partitions: k-means again


# -- retrieval.method bm25 / hybrid: the references' text and its full-text index (storage/lexical.py)


@pytest.fixture(scope="module")
def facts(tmp_path_factory, ray_local):
    """A small facts-corpus bank (invented names), embedded for retrieval.method vector first."""
    cfg, _, names = small_facts_bank(tmp_path_factory.mktemp("embed-lexical"))
    return cfg, names


def test_a_lexical_method_adds_the_text_and_its_index_without_embedding_again(facts, capsys):
    cfg, names = facts
    bank = Bank(cfg.bank.uri)
    vector = bank.table("embeddings")
    assert "text" not in vector.schema.names and fts_info(vector) is None  # vector: the table as it was
    bm25 = with_method(cfg, "bm25")
    out = run_embed(bm25)
    assert out["status"] == "built" and out["computed"] == 0  # every vector copied, none computed
    table = bank.table("embeddings")
    assert out["version"] == table.version  # the version after the full-text index's commit: what is published
    assert fts_info(table) == {"name": "text_idx", "indexed_rows": table.count_rows(), "unindexed_rows": 0}
    refs = bank.dataset("refs").to_table(columns=["ref_id", "text"]).to_pylist()
    rows = table.to_lance().to_table(columns=["ref_id", "text", "vector"]).to_pylist()
    assert {r["ref_id"]: r["text"] for r in rows} == {r["ref_id"]: r["text"] for r in refs}
    old = {r["ref_id"]: r["vector"] for r in vector.to_lance().to_table(columns=["ref_id", "vector"]).to_pylist()}
    assert all(r["vector"] == old[r["ref_id"]] for r in rows)
    assert bank.metadata("embeddings")["fulltext"]["column"] == "text"
    capsys.readouterr()
    assert run_embed(with_method(cfg, "hybrid"))["status"] == "up_to_date"  # the same table: nothing to do
    assert "nothing to do" in capsys.readouterr().out
    # m3 search by BM25 finds an entity's description by its name alone
    entity, name = next(iter(names.items()))
    hits = search_text(bm25, name, k=3)
    assert hits[0]["doc_id"] in _docs_of(bank, entity) and hits[0]["score"] > 1


def test_a_lost_full_text_index_is_built_again_and_vector_drops_it(facts):
    cfg, _ = facts
    bm25 = with_method(cfg, "bm25")
    run_embed(bm25)
    bank = Bank(cfg.bank.uri)
    table = bank.table("embeddings")
    table.drop_index(fts_info(table)["name"])  # as if killed between the data and the index commits
    out = run_embed(bm25)
    assert out["status"] == "up_to_date" and out["version"] == bank.table("embeddings").version
    assert fts_info(bank.table("embeddings")) is not None
    out = run_embed(cfg)  # back to vector: the table without text, every vector copied
    table = bank.table("embeddings")
    assert out["status"] == "built" and out["computed"] == 0
    assert "text" not in table.schema.names and fts_info(table) is None
    with pytest.raises(LexicalIndexError, match="run `m3 embed`"):
        search_text(bm25, "anything")


def with_method(cfg, method: str):
    return dataclasses.replace(cfg, retrieval=dataclasses.replace(cfg.retrieval, method=method))


def _docs_of(bank: Bank, source_id: str) -> set[str]:
    docs = bank.dataset("documents").to_table(columns=["doc_id", "source_id"]).to_pylist()
    return {d["doc_id"] for d in docs if d["source_id"] == source_id}
