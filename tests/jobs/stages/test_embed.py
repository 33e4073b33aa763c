"""The embed job end to end, and `m3 search` over its table."""

from __future__ import annotations


import pytest

from jobs.cli.main import main
from jobs.config import load_config
from jobs.stages.embed import run_embed, search_text
from pipelines.embedder import load_embedder
from storage.bank import Bank, BankError
from storage.vectors import has_index
from tests.conftest import small_embedded_bank

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
    assert sorted((r["ref_id"], r["content_hash"]) for r in refs) == sorted((r["ref_id"], r["content_hash"]) for r in rows)
    assert all(abs(sum(v * v for v in r["vector"]) - 1) < 1e-4 for r in rows)
    meta = bank.metadata("embeddings")
    assert meta["embedder"]["embedder"] == load_embedder(cfg.retrieval.embedder).id == rows[0]["embedder"]
    assert summary["index"]["index"] == "IVF_HNSW_SQ" and has_index(bank.table("embeddings"))  # past the threshold
    assert bank.tags("embeddings") == {f"embed-{meta['embed_key']}": summary["version"]}


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


def test_search_needs_embeddings(tmp_path):
    cfg = load_config("configs/demo.yaml", [f"bank.uri={tmp_path}"])
    with pytest.raises(BankError, match="no embeddings table: run `m3 embed` first"):
        search_text(cfg, "x")
