"""Incremental versions of the encode and embed jobs, for `m3 rebuild`.

Each compares `refs` with the latest derived table (pipelines/delta.py): rows whose reference is
unchanged and whose producer (model + codec; embedder) is the current one are copied; new and
changed references are computed by the same actor classes the full jobs use (a Ray Data actor
pool, or for a one-shard delta the class called in this process), over a small "delta" dataset
holding only those references; removed ones are dropped. The new table is one
version, written with the same key and lineage the full job would write, so `m3 encode` /
`m3 embed` afterwards find nothing to do, and a table built incrementally equals a full build
row for row (same bytes: encoding a reference does not depend on its batch neighbours beyond
padding, which the encoder masks).

Resumable like the full jobs: the delta and the computed shards are staged under a directory
named by the key and the old table's version; a killed rebuild redoes at most the shards that
had not landed.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import lance
import pyarrow as pa

from jobs.config import Config
from jobs.embed import embed_key, embeddings_lineage
from jobs.encode import encode_key, memories_lineage, model_dir, quantizer, sparsity
from jobs.runtime import init_ray, quiet_ray_data, row_shards, run_actor_shards
from model.checkpoint import saved_hash
from pipelines.delta import Delta, keep_filter, plan_delta
from storage.bank import Bank
from storage.staging import iter_batches
from storage.layout import BankLayout


def _delta_refs(refs: lance.LanceDataset, rows, columns: list[str], path: Path) -> str:
    """The references to compute, as their own small Lance dataset (what the actors read by
    row range). Written under a temporary name and renamed, so it exists whole or not at all."""
    if len(rows) == 0:
        return ""  # nothing to compute: no dataset, no shards
    if path.exists():
        return str(path)
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    schema = pa.schema([refs.schema.field(c) for c in columns])

    def batches():
        for lo in range(0, len(rows), 4096):
            for batch in refs.take(rows[lo:lo + 4096], columns=columns).to_batches():
                yield pa.RecordBatch.from_arrays(batch.columns, schema=schema)  # drops the table's metadata

    lance.write_dataset(pa.RecordBatchReader.from_batches(schema, batches()), str(tmp))
    tmp.rename(path)
    return str(path)


def _old_rows(bank: Bank, name: str, producer_columns: list[str]) -> tuple[lance.LanceDataset | None, pa.Table | None]:
    if not bank.has(name):
        return None, None
    ds = bank.dataset(name)
    return ds, ds.to_table(columns=["ref_id", "content_hash", *producer_columns])


def _copied(old: lance.LanceDataset | None, delta: Delta, producer: str, producer_column: str):
    """Stream the old rows that are kept, a batch at a time (the bulk of the table is never in memory)."""
    if old is None or delta.unchanged == 0:
        return
    for batch in old.to_batches(batch_size=4096):
        kept = keep_filter(batch, delta.keep_ids, producer, producer_column)
        if kept.num_rows:
            yield kept


def _run_shards(stage: str, cfg: Config, todo: list, actor_cls, *, actors: int, threads: int, **kw) -> None:
    """The delta's shards through the full job's actors, or, when the delta is one shard, through
    the same class called here: for the few references a small corpus change leaves, starting a
    Ray Data actor pool (a process importing torch and loading the model) costs more than the
    work. Same code, same staged files, same bytes either way."""
    if not todo:
        return
    if len(todo) == 1:
        from jobs.faults import maybe_crash

        (i, a, b), = todo
        actor_cls(threads=threads, **kw)({"shard": [i], "start": [a], "end": [b]})
        maybe_crash(stage, 1)
        return
    init_ray(cfg.ray)
    quiet_ray_data()
    run_actor_shards(stage, todo, actor_cls, actors=actors, threads=threads, **kw)


def update_memories(cfg: Config, bank: Bank, note) -> dict:
    """Bring `memories` up to date with `refs` and the model; returns counts and the version."""
    mdir = model_dir(cfg, bank)
    mhash = saved_hash(mdir)
    refs = bank.dataset("refs")
    old, old_cols = _old_rows(bank, "memories", ["model_hash", "codec"])
    old_meta = bank.metadata("memories") if old is not None else {}
    # table-level settings a row does not carry: a different quantizer or sparsity reuses nothing
    reusable = old is not None and old_meta.get("sparsity") == sparsity(cfg) and old_meta.get("codec") == cfg.encode.codec
    if reusable and cfg.encode.codec == "vq" and old_meta.get("quantizer_path") and Path(old_meta["quantizer_path"]).exists():
        # keep the quantizer the kept rows were coded with (a fresh one would be trained per refs version)
        codec_kw = {"quantizer": old_meta["quantizer_path"], "quantizer_hash": old_meta["quantizer_hash"]}
    else:
        codec_kw = quantizer(cfg, bank, mdir, refs.uri, refs.count_rows())
        reusable = reusable and old_meta.get("quantizer_hash") == codec_kw.get("quantizer_hash")
    key = encode_key(cfg, bank, mhash, codec_kw)
    if old is not None and old_meta.get("encode_key") == key:
        note(f"memories: up to date (encode key {key})")
        return {"status": "up_to_date", "version": old.version, "added": 0, "changed": 0, "removed": 0}
    producer_ok = None
    if old is not None:
        # row-level producer check; a table-level mismatch (quantizer, sparsity) reuses no row
        producer_ok = pa.array([reusable and m == mhash and c == cfg.encode.codec for m, c in zip(
            old_cols.column("model_hash").to_pylist(), old_cols.column("codec").to_pylist())], pa.bool_())
    delta = plan_delta(refs.to_table(columns=["ref_id", "content_hash"]), old_cols, producer_ok)
    full = old is not None and delta.unchanged == 0 and delta.changed > 0
    note(f"memories: model {mhash[:12]}; {delta.counts()}" + (" (full re-encode)" if full else ""))
    stage = BankLayout(bank.uri).staging(f"rebuild-memories-{key}-from{old.version if old else 0}")
    delta_uri = _delta_refs(refs, delta.compute_rows, ["ref_id", "content_hash", "token_ids"], stage / "delta.lance")
    from pipelines.encode_step import EncodeShards, staged_path

    shards = row_shards(len(delta.compute_rows), cfg.encode.refs_per_shard)
    todo = [s for s in shards if not staged_path(stage, s[0]).exists()]
    e = cfg.encode
    _run_shards("encode", cfg, todo, EncodeShards, actors=e.actors, threads=e.threads_per_actor,
                model_dir=str(mdir), codec=e.codec, codec_kw=codec_kw, refs_uri=delta_uri,
                stage_dir=str(stage), batch_size=e.batch_size)
    from storage.schemas import MEMORIES

    def rows():
        yield from _copied(old, delta, mhash, "model_hash")
        yield from iter_batches([staged_path(stage, s[0]) for s in shards])

    lineage = {**memories_lineage(cfg, key, mhash, mdir, bank.metadata("refs"), codec_kw),
               "stage": "rebuild", "rebuild": delta.counts()}
    version = bank.write("memories", MEMORIES, rows(), lineage)
    shutil.rmtree(stage, ignore_errors=True)
    return {"status": "built", "version": version, **delta.counts()}


def update_embeddings(cfg: Config, bank: Bank, note) -> dict:
    """Bring `embeddings` up to date with `refs` (text only: the model does not matter)."""
    from model.embedder import load_embedder
    from pipelines.embed_step import EMBEDDINGS_SCHEMA, INPUT_COLUMNS, EmbedShards
    from storage.vectors import build_index

    r = cfg.retrieval
    embedder = load_embedder(r.embedder)
    refs = bank.dataset("refs")
    old, old_cols = _old_rows(bank, "embeddings", ["embedder"])
    key = embed_key(cfg, bank, embedder)
    if old is not None and bank.metadata("embeddings").get("embed_key") == key:
        note(f"embeddings: up to date (embed key {key})")
        return {"status": "up_to_date", "version": old.version, "added": 0, "changed": 0, "removed": 0}
    producer_ok = None if old is None else pc_equal(old_cols.column("embedder"), embedder.id)
    delta = plan_delta(refs.to_table(columns=["ref_id", "content_hash"]), old_cols, producer_ok)
    note(f"embeddings: {embedder.id}; {delta.counts()}")
    stage = BankLayout(bank.uri).staging(f"rebuild-embeddings-{key}-from{old.version if old else 0}")
    delta_uri = _delta_refs(refs, delta.compute_rows, INPUT_COLUMNS, stage / "delta.lance")
    shards = row_shards(len(delta.compute_rows), r.refs_per_shard)
    files = [stage / f"e{i:06d}.parquet" for i, _, _ in shards]
    todo = [s for s, f in zip(shards, files) if not f.exists()]
    _run_shards("embed", cfg, todo, EmbedShards, actors=r.actors, threads=r.threads_per_actor,
                spec=r.embedder, refs_uri=delta_uri, stage_dir=str(stage), batch_size=r.batch_size)

    def rows():
        yield from _copied(old, delta, embedder.id, "embedder")
        yield from iter_batches(files)

    lineage = {**embeddings_lineage(cfg, key, embedder, bank.metadata("refs")), "stage": "rebuild",
               "rebuild": delta.counts()}
    bank.write("embeddings", EMBEDDINGS_SCHEMA(embedder.dim), rows(), lineage)
    n = refs.count_rows()
    index = build_index(bank.table("embeddings"), n, threshold=r.index_threshold, index_type=r.index_type)
    shutil.rmtree(stage, ignore_errors=True)
    # the index is a commit of its own: the version readers get is the one after it
    return {"status": "built", "version": bank.table("embeddings").version, "index": index.get("index"), **delta.counts()}


def pc_equal(column: pa.ChunkedArray, value: str) -> pa.Array:
    import pyarrow.compute as pc

    return pc.equal(column, value).combine_chunks()
