"""A bank at a URI (`file://...`) runs every stage through the same layout and filesystem code
an object-store bank uses (storage/layout.py, storage/staging.py), and its tables equal those
of the same build at a plain path."""

from __future__ import annotations

import pytest

from jobs.config import load_config
from jobs.stages.embed import run_embed
from jobs.stages.encode import run_encode
from jobs.stages.ingest import run_ingest
from jobs.stages.pair import run_pair
from storage.bank import Bank
from storage.layout import BankLayout
from storage.sql import query
from tests.conftest import write_foldoc_corpus

TABLES = {"documents": "doc_id", "refs": "ref_id", "train_sequences": "seq_id", "embeddings": "ref_id",
          "memories": "ref_id", "neighbors": None}


def build(corpus, uri: str):
    cfg = load_config("configs/demo.yaml", [
        f"corpus.paths=[{corpus}]", f"bank.uri={uri}", "tokenizer.vocab_size=600", "chunking.seq_len=256",
        "ray.num_cpus=2", "retrieval.refs_per_shard=64", "encode.refs_per_shard=64", "encode.codec=raw-fp32",
        "pair.seqs_per_shard=32"])
    for run in (run_ingest, run_embed, run_encode, run_pair):
        run(cfg)
    return cfg


def rows(uri: str, table: str, key: str | None) -> list:
    t = Bank(uri).dataset(table).to_table()
    drop = [c for c in t.column_names if c in ("vector", "score")]  # floats: compared by value below
    out = t.drop(drop).to_pylist()
    return sorted(out, key=lambda r: str(r[key]) if key else str(sorted(r.items())))


@pytest.fixture(scope="module")
def banks(tmp_path_factory, ray_local):
    root = tmp_path_factory.mktemp("uri")
    corpus = write_foldoc_corpus(root / "c.jsonl.gz", 24, min_words=60)
    plain, uri = str(root / "plain"), f"file://{root / 'at-uri'}"
    return build(corpus, plain), build(corpus, uri), plain, uri, root


def test_every_stage_writes_the_same_tables_at_a_uri(banks):
    _, cfg, plain, uri, root = banks
    assert cfg.bank.uri == uri  # a URI is kept as written, not made a local path
    for table, key in TABLES.items():
        assert rows(uri, table, key) == rows(plain, table, key), table
    # the staging of every stage was cleaned up, and the tokenizer the lineage names is there
    assert not list((root / "at-uri" / "_staging").glob("*"))
    tok = Bank(uri).metadata("refs")["tokenizer_path"]
    assert tok.startswith("tokenizers/") and BankLayout(uri).path(tok).exists()


def test_sql_and_reruns_work_on_a_uri_bank(banks, capsys):
    cfg = banks[1]
    columns, got = query(Bank(cfg.bank.uri), "SELECT count(*) FROM memories")
    assert got[0][0] == Bank(cfg.bank.uri).dataset("refs").count_rows()
    assert run_encode(cfg)["status"] == "up_to_date" and run_pair(cfg)["status"] == "up_to_date"
    assert "nothing to do" in capsys.readouterr().out
