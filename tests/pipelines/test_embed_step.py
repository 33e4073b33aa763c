"""The embed stage: refs rows -> embeddings rows, called directly and through a Ray actor pool,
written to a bank and searched back."""

from __future__ import annotations

import hashlib

import numpy as np
import pyarrow as pa
import pytest

from pipelines.embed_step import EMBEDDINGS_SCHEMA, EmbedRefs, to_arrow
from storage.bank import Bank
from storage.vectors import search
from tests.conftest import foldoc_records


def refs_rows(n: int) -> dict[str, np.ndarray]:
    """A refs batch as Ray's numpy format gives it: one reference per FOLDOC entry."""
    recs = foldoc_records(n, min_words=30)
    texts = [r["text"][:500] for r in recs]
    return {
        "ref_id": np.array([f"{r['id']}-0000" for r in recs], dtype=object),
        "text": np.array(texts, dtype=object),
        "content_hash": np.array([hashlib.blake2b(t.encode(), digest_size=8).hexdigest() for t in texts], dtype=object),
    }


@pytest.fixture(scope="module")
def step() -> EmbedRefs:
    return EmbedRefs("minilm", batch_size=32)


def test_schema():
    schema = EMBEDDINGS_SCHEMA(384)
    assert schema.names == ["ref_id", "embedder", "content_hash", "vector"]
    assert schema.field("vector").type == pa.list_(pa.float32(), 384)
    assert all(not f.nullable for f in schema)
    with pytest.raises(ValueError):
        EMBEDDINGS_SCHEMA(0)


def test_batch_maps_refs_to_embeddings(step):
    batch = refs_rows(20)
    out = step(batch)
    assert list(out) == ["ref_id", "embedder", "content_hash", "vector"]
    assert list(out["ref_id"]) == list(batch["ref_id"])
    assert list(out["content_hash"]) == list(batch["content_hash"])
    assert set(out["embedder"]) == {step.embedder.id}
    assert out["vector"].shape == (20, 384) and out["vector"].dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(out["vector"], axis=1), 1.0, atol=1e-5)
    rb = to_arrow(out, step.dim)
    assert rb.schema == EMBEDDINGS_SCHEMA(384) and rb.num_rows == 20
    np.testing.assert_array_equal(rb.column("vector").flatten().to_numpy().reshape(20, 384), out["vector"])


def test_missing_column_is_named(step):
    batch = refs_rows(2)
    del batch["content_hash"]
    with pytest.raises(KeyError, match="content_hash"):
        step(batch)


def test_written_table_is_searchable(step, tmp_path):
    batch = refs_rows(60)
    out = step(batch)
    bank = Bank(str(tmp_path / "bank"))
    bank.write("embeddings", EMBEDDINGS_SCHEMA(step.dim), [to_arrow(out, step.dim)], step.embedder.lineage())
    table = bank.table("embeddings")
    assert table.count_rows() == 60
    step.embedder.check_lineage(bank.metadata("embeddings"))  # the query embedder matches the table's
    # a stored reference's own text finds itself first, with cosine ~1
    hits = search(table, step.embedder.embed([batch["text"][7]]), k=5)[0]
    assert hits[0][0] == batch["ref_id"][7] and hits[0][1] == pytest.approx(1.0, abs=1e-4)
    # a paraphrase finds its entry (FOLDOC's /dev/null entry)
    query = step.embedder.embed(["the Unix device file that throws away everything written to it"])
    assert "foldoc:53-0000" in [rid for rid, _ in search(table, query, k=5)[0]]


@pytest.mark.slow
def test_ray_actor_pool_matches_direct_call(step, ray_local):
    ray = ray_local
    batch = refs_rows(24)
    ds = ray.data.from_items([{k: batch[k][i] for k in batch} for i in range(24)])
    # fractional CPUs: a pool that takes both cores starves the read task (pipelines/embed_step.py)
    out = ds.map_batches(
        EmbedRefs,
        fn_constructor_args=("minilm",),
        batch_size=12,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=1),
        num_cpus=0.5,
    )
    tables = [to_arrow(b, step.dim) for b in out.iter_batches(batch_format="pyarrow", batch_size=None)]
    got = pa.Table.from_batches(tables)
    assert got.num_rows == 24 and got.schema == EMBEDDINGS_SCHEMA(384)
    direct = step(batch)
    order = {rid: i for i, rid in enumerate(direct["ref_id"])}
    vecs = got.column("vector").combine_chunks().flatten().to_numpy().reshape(24, 384)
    idx = [order[r] for r in got.column("ref_id").to_pylist()]
    np.testing.assert_allclose(vecs, direct["vector"][idx], atol=1e-5)
