"""A version that deletes some rows and appends others shares every unchanged file."""

from __future__ import annotations

import json

import lance
import numpy as np
import pyarrow as pa
import pytest
from hypothesis import given
from hypothesis import strategies as st
from lance import LanceOperation, Transaction
from lance.fragment import write_fragments

from storage.bank import Bank, _commit_key, with_lineage
from storage.table_delta import PROPERTY, by_fragment

SCHEMA = pa.schema([("ref_id", pa.string()), ("x", pa.int64())])


def batch(ids: list[str], base: int = 0) -> pa.RecordBatch:
    return pa.RecordBatch.from_arrays(
        [pa.array(ids), pa.array(range(base, base + len(ids)), pa.int64())], schema=SCHEMA
    )


@pytest.fixture
def bank(tmp_path) -> Bank:
    bank = Bank(str(tmp_path / "bank"))
    bank.write("t", SCHEMA, [batch([f"r{i}" for i in range(50)])], {"t_key": "one"})
    return bank


def addresses(bank: Bank, ids: set[str]) -> np.ndarray:
    t = bank.dataset("t").to_table(columns=["ref_id"], with_row_address=True)
    keep = np.array([r in ids for r in t.column("ref_id").to_pylist()])
    return t.column("_rowaddr").to_numpy()[keep]


def files(bank: Bank, version: int | None = None) -> set[str]:
    ds = lance.dataset(bank.layout.table("t"), version=version)
    return {f.data_files()[0].path for f in ds.get_fragments()}


@given(st.lists(st.tuples(st.integers(0, 5), st.integers(0, 2**20)), max_size=40))
def test_by_fragment_groups_offsets_by_fragment(pairs):
    addr = np.array([(f << 32) | o for f, o in pairs], dtype=np.uint64)
    got = by_fragment(addr)
    assert got == {f: sorted({o for g, o in pairs if g == f}) for f in {g for g, _ in pairs}}


def test_update_deletes_appends_and_shares_the_old_file(bank):
    v1 = bank.table("t").version
    gone = addresses(bank, {"r3", "r7"})
    v = bank.update("t", SCHEMA, v1, gone, [batch(["r3", "n1"], 100)], {"t_key": "two"})
    rows = dict(zip(*bank.dataset("t").to_table().to_pydict().values()))
    assert len(rows) == 50 and rows["r3"] == 100 and rows["n1"] == 101 and "r7" not in rows
    assert files(bank, v1) < files(bank, v)  # the first version's file is read by the new one
    assert bank.metadata("t")["t_key"] == "two" and bank.table("t").version == v
    assert lance.dataset(bank.layout.table("t"), version=v1).count_rows() == 50  # time travel intact


def test_update_with_nothing_to_delete_or_append_writes_the_lineage(bank):
    v = bank.update("t", SCHEMA, bank.table("t").version, np.zeros(0, np.uint64), [], {"t_key": "three"})
    assert bank.metadata("t")["t_key"] == "three" and bank.dataset("t").count_rows() == 50
    assert bank.table("t").version == v


def test_a_job_killed_between_the_two_commits_finishes_with_the_metadata(bank):
    """The Update committed, its metadata not: finish_update writes only the metadata; an update
    of another commit is not finished by it."""
    uri, lineage = bank.layout.table("t"), {"t_key": "two"}
    ds = lance.dataset(uri)
    frag = ds.get_fragment(0).delete_rows([0])
    new = write_fragments(batch(["n1"]), uri, schema=SCHEMA, data_storage_version=ds.data_storage_version)
    op = LanceOperation.Update(updated_fragments=[frag], new_fragments=new)
    props = {PROPERTY: _commit_key(lineage)}
    lance.LanceDataset.commit(uri, Transaction(ds.version, op, transaction_properties=props), read_version=ds.version)
    assert bank.metadata("t")["t_key"] == "one"  # killed here
    assert bank.finish_update("t", SCHEMA, {"t_key": "other"}) is None
    v = bank.finish_update("t", SCHEMA, lineage)
    assert v == bank.table("t").version and bank.metadata("t")["t_key"] == "two"
    assert bank.dataset("t").count_rows() == 50  # one gone, one added: nothing applied twice


def test_the_lineage_is_the_one_a_full_write_records(bank):
    meta = json.loads(with_lineage("t", SCHEMA, {"t_key": "k"}).metadata[b"m3"])
    bank.update("t", SCHEMA, bank.table("t").version, np.zeros(0, np.uint64), [], {"t_key": "k"})
    got = bank.metadata("t")
    assert {k: got[k] for k in ("schema_version", "table", "t_key")} == {
        k: meta[k] for k in ("schema_version", "table", "t_key")
    }
