"""The bank's tables: one commit per write, lineage in metadata, schema versions enforced."""

import json

import pyarrow as pa
import pytest

from storage.bank import LATEST, META_KEY, Bank, BankError
from storage.schemas import SCHEMA_VERSION, TRAIN_SEQUENCES
from storage.sql import SQLError, query, render


def seqs(n, start=0):
    return pa.table(
        {
            "seq_id": [f"s{i}" for i in range(start, start + n)],
            "token_ids": [[i, i + 1] for i in range(n)],
            "doc_ids": [["d"] for _ in range(n)],
        },
        schema=TRAIN_SEQUENCES,
    )


def test_write_is_one_version_with_lineage(tmp_path):
    bank = Bank(str(tmp_path))
    v1 = bank.write("train_sequences", TRAIN_SEQUENCES, seqs(5).to_batches(max_chunksize=2), {"ingest_key": "a"})
    v2 = bank.write("train_sequences", TRAIN_SEQUENCES, seqs(3).to_batches(), {"ingest_key": "b"})
    assert v2 == v1 + 1
    assert bank.table("train_sequences").count_rows() == 3  # a write replaces, in one commit
    meta = bank.metadata("train_sequences")
    assert meta["ingest_key"] == "b" and meta["schema_version"] == SCHEMA_VERSION
    assert bank.tables() == ["train_sequences"]


def test_other_schema_version_is_refused(tmp_path):
    bank = Bank(str(tmp_path))
    schema = TRAIN_SEQUENCES.with_metadata({META_KEY: json.dumps({"schema_version": 999}).encode()})
    bank.db.create_table("train_sequences", data=seqs(2).cast(schema), schema=schema)
    with pytest.raises(BankError, match="schema version 999.*reads version"):
        bank.table("train_sequences")


def test_missing_table_names_what_exists(tmp_path):
    bank = Bank(str(tmp_path))
    bank.write("train_sequences", TRAIN_SEQUENCES, seqs(1).to_batches(), {})
    with pytest.raises(BankError, match="no table 'refs' .*train_sequences"):
        bank.table("refs")


def test_sql_reads_and_cannot_write(tmp_path):
    bank = Bank(str(tmp_path))
    bank.write("train_sequences", TRAIN_SEQUENCES, seqs(4).to_batches(), {})
    cols, rows = query(bank, "SELECT seq_id, token_ids FROM train_sequences WHERE seq_id > 's1' ORDER BY 1")
    assert cols == ["seq_id", "token_ids"] and [r[0] for r in rows] == ["s2", "s3"]
    text = render(cols, rows)
    assert "<2 items>" in text and "(2 rows)" in text  # token lists summarized, not dumped
    assert render(cols, rows, "csv").splitlines()[0] == "seq_id,token_ids"
    assert json.loads(render(cols, rows, "json").splitlines()[0])["seq_id"] == "s2"
    with pytest.raises(SQLError):
        query(bank, "INSERT INTO train_sequences VALUES ('x', [1], ['d'])")
    with pytest.raises(SQLError, match="tables: train_sequences"):
        query(bank, "SELECT * FROM nope")
    assert bank.table("train_sequences").count_rows() == 4


def test_bank_of_a_config_knows_where_training_lives(tmp_path):
    from types import SimpleNamespace as NS

    from storage.layout import LayoutError

    bank = Bank.of(NS(bank=NS(uri=str(tmp_path / "bank"))))
    assert bank.uri == str(tmp_path / "bank") and bank.layout.uri == bank.uri and not bank.live
    assert bank.training("warmup") == (tmp_path / "bank" / "training").resolve() / "warmup"
    assert bank.trained_model("continual") == bank.training("continual") / "model"
    runs = Bank.of(NS(bank=NS(uri=str(tmp_path / "bank")), train=NS(run_dir=f"file://{tmp_path}/runs")))
    assert runs.training("warmup") == (tmp_path / "runs").resolve() / "warmup"
    with pytest.raises(LayoutError, match="train.run_dir=s3://b/runs: training checkpoints"):
        Bank(str(tmp_path), run_dir="s3://b/runs").training("warmup")
    with pytest.raises(LayoutError, match="train.run_dir: the bank at s3://b/bank is on an object store"):
        Bank("s3://b/bank").training("continual")  # no bucket asked: a Bank connects on first use


def test_a_pickled_bank_reconnects_and_keeps_its_build(tmp_path):
    """Ray ships a Bank to actors: a live reader there reads the build the driver resolved, even
    after a newer write."""
    import pickle

    from storage.live import publish

    bank = Bank(str(tmp_path), run_dir=str(tmp_path / "runs"))
    v1 = bank.write("train_sequences", TRAIN_SEQUENCES, seqs(2).to_batches(), {})
    publish(bank, {"train_sequences": v1})
    live = Bank(str(tmp_path), live=True)
    bank.write("train_sequences", TRAIN_SEQUENCES, seqs(5).to_batches(), {})
    copy = pickle.loads(pickle.dumps(live))
    assert (copy.uri, copy.live, copy.pins, copy.run_dir) == (live.uri, True, {"train_sequences": v1}, None)
    assert copy.dataset("train_sequences").count_rows() == 2 == copy.table("train_sequences").count_rows()
    assert pickle.loads(pickle.dumps(bank)).training("x") == (tmp_path / "runs").resolve() / "x"


def test_dataset_at_a_version(tmp_path):
    bank = Bank(str(tmp_path))
    v1 = bank.write("train_sequences", TRAIN_SEQUENCES, seqs(3).to_batches(), {})
    bank.write("train_sequences", TRAIN_SEQUENCES, seqs(1).to_batches(), {})
    assert bank.dataset("train_sequences").count_rows() == 1
    assert bank.dataset("train_sequences", version=v1).count_rows() == 3
    pinned = bank.at({"train_sequences": v1})  # what storage/builds.py resolves a build to
    assert pinned.dataset("train_sequences").count_rows() == 3
    assert pinned.dataset("train_sequences", LATEST).count_rows() == 1
