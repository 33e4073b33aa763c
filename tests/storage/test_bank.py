"""The bank's tables: one commit per write, lineage in metadata, schema versions enforced."""

import json

import pyarrow as pa
import pytest

from storage.bank import META_KEY, Bank, BankError
from storage.schemas import SCHEMA_VERSION, TRAIN_SEQUENCES
from storage.sql import SQLError, query, render


def seqs(n, start=0):
    return pa.table({"seq_id": [f"s{i}" for i in range(start, start + n)],
                     "token_ids": [[i, i + 1] for i in range(n)],
                     "doc_ids": [["d"] for _ in range(n)]}, schema=TRAIN_SEQUENCES)


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
