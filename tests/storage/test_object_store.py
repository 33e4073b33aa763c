"""The storage layer of a bank on an object store (`s3://`), against the S3-compatible server of
the `s3` fixture (tests/conftest.py): staged files, tables, builds, the live manifest and SQL.
The stages on such a bank: tests/jobs/stages/test_uri_bank.py."""

from __future__ import annotations

import pyarrow as pa

from storage.bank import Bank
from storage.layout import BankLayout
from storage.live import live_versions, read_manifest
from storage.sql import query
from storage.staging import iter_batches, read_table, remove, write_atomic, write_text_atomic
from tests.storage.banks import B1_REFS, B2_REFS, two_builds


def test_staged_files_appear_whole_are_read_back_and_removed(s3):
    stage = BankLayout(f"{s3[0]}/staging-bank").staging("encode-k")
    t = pa.table({"a": list(range(100))})
    write_atomic(stage / "m000000.parquet", t)
    write_text_atomic(stage / "note.txt", "done")
    assert str(stage).startswith("s3://") and (stage / "m000000.parquet").exists()
    assert read_table(stage / "m000000.parquet").equals(t)
    assert sum(b.num_rows for b in iter_batches([stage / "m000000.parquet"], batch_size=30)) == 100
    remove(stage)
    assert not (stage / "m000000.parquet").exists()


def test_tables_builds_manifest_and_sql_on_a_bucket(s3):
    uri = f"{s3[0]}/builds-bank"
    bank = two_builds(uri)
    manifest = read_manifest(bank)
    assert manifest is not None and live_versions(bank) == manifest["versions"]
    assert BankLayout(uri).manifest().exists() and str(BankLayout(uri).manifest()) == f"{uri}/_live.json"
    live = Bank(uri, live=True)
    assert sorted(live.dataset("refs").to_table().column("ref_id").to_pylist()) == sorted(B2_REFS)
    _, rows = query(live, "SELECT count(*) FROM refs")
    assert rows[0][0] == len(B2_REFS)
    first = manifest["history"][0]["versions"]
    old = Bank(uri)
    old.pins = dict(first)  # a reader of the first build still reads it: both versions are on the bucket
    assert sorted(old.dataset("refs").to_table().column("ref_id").to_pylist()) == sorted(B1_REFS)
