"""A bank on an object store: ingest, embed, encode and pair run on `s3://` (the S3-compatible
server of the `s3` fixture, tests/conftest.py), through the same layout and filesystem code any
URI gets (storage/layout.py, storage/staging.py), and write the same tables as the same build at
a plain path. Both builds run in this process: the suite's Ray started with the S3 endpoint in its
workers' environment (tests/conftest.py)."""

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

TABLES = {
    "documents": "doc_id",
    "refs": "ref_id",
    "train_sequences": "seq_id",
    "embeddings": "ref_id",
    "memories": "ref_id",
    "neighbors": None,
}


def settings(corpus, uri: str, model) -> list[str]:
    return [
        f"corpus.paths=[{corpus}]",
        f"bank.uri={uri}",
        "tokenizer.vocab_size=600",
        "chunking.seq_len=256",
        "ray.num_cpus=2",
        "retrieval.refs_per_shard=64",
        "encode.refs_per_shard=64",
        "encode.codec=raw-fp32",
        "pair.seqs_per_shard=32",
        f"encode.checkpoint={model}",
    ]


def rows(uri: str, table: str, key: str | None) -> list:
    t = Bank(uri).dataset(table).to_table()
    t = t.drop([c for c in t.column_names if c in ("vector", "score")])  # floats from another process
    return sorted(t.to_pylist(), key=lambda r: str(r[key]) if key else str(sorted(r.items())))


@pytest.fixture(scope="module")
def banks(tmp_path_factory, ray_local, s3):
    import torch

    from model import Memory3, save_model

    root = tmp_path_factory.mktemp("uri")
    corpus = write_foldoc_corpus(root / "c.jsonl.gz", 24, min_words=60)
    # the model to encode with, on local disk: an object-store bank keeps no models (layout.py)
    model = root / "model"
    torch.manual_seed(0)
    save_model(Memory3(load_config("configs/demo.yaml").model), model)
    plain, uri = str(root / "plain"), f"{s3[0]}/bank"
    cfg = load_config("configs/demo.yaml", settings(corpus, plain, model))
    for run in (run_ingest, run_embed, run_encode, run_pair):
        run(cfg)
    s3_cfg = load_config("configs/demo.yaml", settings(corpus, uri, model))
    for run in (run_ingest, run_embed, run_encode, run_pair):
        run(s3_cfg)
    return cfg, s3_cfg, plain, uri


def test_every_stage_writes_the_same_tables_on_s3(banks):
    _, cfg, plain, uri = banks
    assert cfg.bank.uri == uri  # a URI is kept as written, not made a local path
    for table, key in TABLES.items():
        assert rows(uri, table, key) == rows(plain, table, key), table
    # every stage cleaned its staging up, and the tokenizer the lineage names is in the bucket
    assert not BankLayout(uri).path("_staging").exists() or not list(BankLayout(uri).path("_staging").iterdir())
    tok = Bank(uri).metadata("refs")["tokenizer_path"]
    assert tok.startswith("tokenizers/") and BankLayout(uri).path(tok).exists()


def test_sql_and_reruns_work_on_an_s3_bank(banks, capsys):
    cfg = banks[1]
    _, got = query(Bank(cfg.bank.uri), "SELECT count(*) FROM memories")
    assert got[0][0] == Bank(cfg.bank.uri).dataset("refs").count_rows()
    assert run_encode(cfg)["status"] == "up_to_date" and run_pair(cfg)["status"] == "up_to_date"
    assert "nothing to do" in capsys.readouterr().out
