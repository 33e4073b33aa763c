"""The ANN index brought up to date after a commit that kept it (issue 26): a delta index over
the new fragments only, the old index's files shared with the version before, and the whole
build where storage.vectors.update_plan says a delta would make the index worse.

The commit is simulated with Lance's own APIs (a delete: deletion vectors on the old fragments;
an append: new fragments), which leave the table as the stage's one Update transaction does."""

from __future__ import annotations

import os

import lance
import numpy as np
import pyarrow as pa
import pytest

from pipelines.embed_step import EMBEDDINGS_SCHEMA
from storage import vectors
from storage.bank import Bank
from storage.vectors import AnnParams, build_index, index_info, index_segments, search, update_index

DIM = 32
N = 3000
THRESHOLD = 1000


def unit(n: int, seed: int) -> np.ndarray:
    v = np.random.default_rng(seed).standard_normal((n, DIM)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def rows(v: np.ndarray, prefix: str) -> pa.Table:
    n = len(v)
    return pa.Table.from_batches(
        [
            pa.RecordBatch.from_arrays(
                [
                    pa.array([f"{prefix}{i}" for i in range(n)]),
                    pa.array(["e"] * n),
                    pa.array(["h"] * n),
                    pa.FixedSizeListArray.from_arrays(pa.array(v.reshape(-1), pa.float32()), DIM),
                ],
                schema=EMBEDDINGS_SCHEMA(DIM),
            )
        ]
    )


@pytest.fixture
def bank(tmp_path):
    b = Bank(str(tmp_path / "bank"))
    b.write("embeddings", EMBEDDINGS_SCHEMA(DIM), rows(unit(N, 0), "r").to_batches(), {"embedder": "random"})
    report = build_index(b.table("embeddings"), threshold=THRESHOLD)
    assert report["index"] == "IVF_HNSW_SQ" and index_info(b.table("embeddings"))["unindexed_rows"] == 0
    return b


def commit(bank: Bank, gone: list[str], new: np.ndarray, prefix: str = "n") -> None:
    """What the stage's Update does to the table: deletion vectors, then new fragments."""
    uri = bank.dataset("embeddings").uri
    if gone:
        lance.dataset(uri).delete("ref_id IN (" + ", ".join(f"'{r}'" for r in gone) + ")")
    if len(new):
        lance.write_dataset(rows(new, prefix), uri, mode="append")


def index_files(bank: Bank, version: int | None = None) -> dict[str, int]:
    """{path: bytes} of every index file the version's manifest names."""
    ds = (
        bank.dataset("embeddings")
        if version is None
        else lance.dataset(bank.dataset("embeddings").uri, version=version)
    )
    out = {}
    for idx in ds.list_indices():
        d = os.path.join(ds.uri, "_indices", idx["uuid"])
        for name in os.listdir(d):
            out[os.path.join(d, name)] = os.path.getsize(os.path.join(d, name))
    return out


def test_a_delta_indexes_only_the_new_rows_and_shares_the_old_index(bank):
    before_version = bank.table("embeddings").version
    before = index_files(bank)
    gone = [f"r{i}" for i in range(0, 300, 3)]  # 100 rows changed or went away
    new = unit(60, 1)
    commit(bank, gone, new)
    table = bank.table("embeddings")
    assert index_info(table)["unindexed_rows"] == 60  # the commit kept the index; the new rows are not in it

    report = update_index(table, threshold=THRESHOLD)
    assert report["update"] == "incremental" and report["indexed_rows"] == 60 and report["index"] == "IVF_HNSW_SQ"
    table = bank.table("embeddings")
    live = table.count_rows()
    assert live == N - 100 + 60
    assert index_info(table) | {"name": None} == {
        "name": None,
        "index_type": "IVF_HNSW_SQ",
        "indexed_rows": live,
        "unindexed_rows": 0,
    }
    segs = index_segments(table)
    assert [s["rows"] for s in segs] == [N, 60]  # the base (deleted rows still in it) and the delta
    # the previous version's index files: named again, unchanged, not copied
    after = index_files(bank)
    assert {p: b for p, b in after.items() if p in before} == before == index_files(bank, before_version)
    delta = {p: b for p, b in after.items() if p not in before}
    assert delta and sum(delta.values()) < 0.1 * sum(before.values())
    index_dir = os.path.join(bank.dataset("embeddings").uri, "_indices")
    assert len(os.listdir(index_dir)) == 2

    # deleted rows never come back; an appended vector is its own nearest neighbour (through the
    # delta index, not a flat scan: nothing is unindexed)
    old = unit(N, 0)
    gone_hits = search(table, old[[int(r[1:]) for r in gone]], k=10)
    assert not {rid for hits in gone_hits for rid, _ in hits} & set(gone)
    found = search(table, new, k=1)
    assert [hits[0][0] for hits in found] == [f"n{i}" for i in range(60)]
    kept = search(table, old[300:340], k=1)
    assert [hits[0][0] for hits in kept] == [f"r{i}" for i in range(300, 340)]


def test_a_commit_that_only_deleted_rows_commits_nothing(bank):
    commit(bank, [f"r{i}" for i in range(50)], unit(0, 1))
    version = bank.table("embeddings").version
    report = update_index(bank.table("embeddings"), threshold=THRESHOLD)
    assert report["update"] == "incremental" and report["indexed_rows"] == 0
    assert bank.table("embeddings").version == version and len(index_segments(bank.table("embeddings"))) == 1


def _full(bank: Bank, **kw) -> dict:
    report = update_index(bank.table("embeddings"), threshold=THRESHOLD, **kw)
    table = bank.table("embeddings")
    assert report["update"] == "full" and report["indexed_rows"] == table.count_rows()
    assert len(index_segments(table)) == 1 and index_info(table)["unindexed_rows"] == 0
    return report


def test_no_index_is_a_full_build(tmp_path):
    b = Bank(str(tmp_path / "bank"))
    b.write("embeddings", EMBEDDINGS_SCHEMA(DIM), rows(unit(N, 0), "r").to_batches(), {})
    assert _full(b)["reason"] == "no index"


def test_many_new_rows_are_a_full_build(bank):
    commit(bank, [], unit(1200, 1))  # 1,200 of 4,200 rows new: past MAX_DELTA_FRACTION
    assert "rows in deltas" in _full(bank)["reason"]


def test_many_deleted_rows_are_a_full_build(bank):
    commit(bank, [f"r{i}" for i in range(700)], unit(10, 1))  # 700 of the index's 3,000 rows gone
    assert "deleted rows" in _full(bank)["reason"]


def test_too_many_deltas_are_a_full_build(bank, monkeypatch):
    monkeypatch.setattr(vectors, "MAX_DELTA_INDICES", 2)
    for i in range(2):
        commit(bank, [f"r{i}"], unit(5, i + 1), prefix=f"n{i}_")
        assert update_index(bank.table("embeddings"), threshold=THRESHOLD)["update"] == "incremental"
    assert len(index_segments(bank.table("embeddings"))) == 3
    commit(bank, ["r9"], unit(5, 9), prefix="n9_")
    assert "delta indices" in _full(bank)["reason"]


def test_other_index_parameters_are_a_full_build(bank):
    commit(bank, [], unit(10, 1))
    two = AnnParams("IVF_HNSW_SQ", num_partitions=2, nprobes=1, ef=64)  # as if past 2M rows
    assert "partitions" in _full(bank, params=two)["reason"]
    commit(bank, [], unit(10, 2), prefix="m")
    report = _full(bank, index_type="IVF_PQ")  # the configured type changed
    assert report["index"] == "IVF_PQ" and "IVF_HNSW_SQ" in report["reason"]


def test_below_the_threshold_the_index_goes(bank):
    commit(bank, [f"r{i}" for i in range(2500)], unit(0, 1))
    report = update_index(bank.table("embeddings"), threshold=THRESHOLD)
    assert report["index"] is None and index_info(bank.table("embeddings")) is None


def test_the_stages_update_commit_keeps_the_index_for_a_delta(bank):
    # the commit a rebuild makes (storage/table_delta.py: one Update, then the lineage's commit)
    from storage.table_delta import commit_update

    ds, lineage = bank.dataset("embeddings"), bank.metadata("embeddings")
    gone = ds.to_table(columns=["ref_id"], with_row_address=True, filter="ref_id IN ('r5', 'r6', 'r7')")
    new = rows(unit(40, 3), "u")
    commit_update(ds.uri, ds.version, gone.column("_rowaddr").to_numpy(), ds.schema, new.to_batches(), key="k")
    table = bank.table("embeddings")
    assert index_info(table)["unindexed_rows"] == 40 and bank.metadata("embeddings") == lineage
    report = update_index(table, threshold=THRESHOLD)
    assert report["update"] == "incremental" and report["indexed_rows"] == 40
    table = bank.table("embeddings")
    assert index_info(table)["unindexed_rows"] == 0 and index_info(table)["indexed_rows"] == N - 3 + 40
    assert bank.metadata("embeddings") == lineage  # the lineage kept by the index's commit
    assert [h[0][0] for h in search(table, unit(40, 3), k=1)] == [f"u{i}" for i in range(40)]
