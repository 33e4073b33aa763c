"""`m3 embed`: a retrieval vector for every reference (the `embeddings` table) and its ANN index.

    python -m jobs embed -c configs/demo.yaml

Same shape as the encode job: Ray Data actors (one embedder each) embed row ranges of `refs`
into staging files; one commit makes the new table version, tagged; past a size threshold an
ANN index is built on it (cosine). The key covers the refs version and the embedder's
fingerprint: the same key is nothing to do, an unfinished one resumes.
"""

from __future__ import annotations

import shutil

from jobs.config import Config, config_hash
from jobs.report import Report
from jobs.runtime import init_ray, quiet_ray_data, row_shards, run_actor_shards
from model.embedder import load_embedder
from pipelines.embed_step import EMBEDDINGS_SCHEMA, EmbedShards
from storage.bank import Bank
from storage.staging import iter_batches
from storage.vectors import build_index
from storage.layout import BankLayout


def embed_key(cfg: Config, bank: Bank, embedder) -> str:
    """What an embeddings table is a function of (shared with the incremental rebuild)."""
    return config_hash({"embedder": embedder.id, "refs": bank.metadata("refs").get("ingest_key"),
                        "refs_version": bank.table("refs").version, "per": cfg.retrieval.refs_per_shard})


def embeddings_lineage(cfg: Config, key: str, embedder, refs_meta: dict) -> dict:
    return {"stage": "embed", "embed_key": key, "embedder": embedder.lineage(),
            "tokenizer_hash": refs_meta.get("tokenizer_hash"), "ingest_key": refs_meta.get("ingest_key"),
            "config": cfg.as_dict()}


def run_embed(cfg: Config) -> dict:
    report = Report("embed")
    bank = Bank(cfg.bank.uri)
    bank.require("refs")
    r = cfg.retrieval
    embedder = load_embedder(r.embedder)  # fails here, before Ray, if the model is missing
    refs_meta = bank.metadata("refs")
    refs_ds = bank.dataset("refs")
    refs_uri, n_refs = refs_ds.uri, refs_ds.count_rows()
    key = embed_key(cfg, bank, embedder)
    if bank.has("embeddings") and bank.metadata("embeddings").get("embed_key") == key:
        print(f"embed: embeddings in {cfg.bank.uri} are up to date for {embedder.id} (embed key {key}); nothing to do")
        return {"status": "up_to_date", "embed_key": key}
    stage_dir = BankLayout(cfg.bank.uri).staging(f"embed-{key}")
    shards = row_shards(n_refs, r.refs_per_shard)
    todo = [s for s in shards if not (stage_dir / f"e{s[0]:06d}.parquet").exists()]
    init_ray(cfg.ray)
    quiet_ray_data()
    with report.stage("embed"):
        report.note(f"embed: {embedder.id}, {n_refs:,} references, {len(shards) - len(todo)} of {len(shards)} shard(s) done")
        run_actor_shards("embed", todo, EmbedShards, actors=r.actors, threads=r.threads_per_actor,
                         spec=r.embedder, refs_uri=refs_uri, stage_dir=str(stage_dir), batch_size=r.batch_size)
    with report.stage("commit"):
        lineage = embeddings_lineage(cfg, key, embedder, refs_meta)
        files = [stage_dir / f"e{i:06d}.parquet" for i, _, _ in shards]
        version = bank.write("embeddings", EMBEDDINGS_SCHEMA(embedder.dim), iter_batches(files), lineage)
        index = build_index(bank.table("embeddings"), n_refs, threshold=r.index_threshold, index_type=r.index_type)
        bank.tag("embeddings", f"embed-{key}", version)
    shutil.rmtree(stage_dir, ignore_errors=True)
    seconds = report.stages.get("embed", 0)
    print(f"embed: {n_refs:,} vectors ({embedder.id}, dim {embedder.dim}) as embeddings version {version} "
          f"in {report.elapsed():.1f} s ({n_refs / max(seconds, 1e-9):,.1f} refs/s); "
          f"index: {index.get('index') or index.get('reason')}")
    return {"version": version, "embed_key": key, "index": index, "references": n_refs}


def search_text(cfg: Config, text: str, k: int = 5, exact: bool = False) -> list[dict]:
    """The top-k references for a query text, with their text."""
    bank = Bank(cfg.bank.uri)
    bank.require("embeddings")
    embedder = load_embedder(cfg.retrieval.embedder)
    embedder.check_lineage(bank.metadata("embeddings")["embedder"])
    from storage.vectors import search

    hits = search(bank.table("embeddings"), embedder.embed([text]), k=k, exact=exact)[0]
    ids = [h[0] for h in hits]
    quoted = ", ".join("'" + i.replace("'", "''") + "'" for i in ids) or "''"
    rows = bank.dataset("refs").to_table(columns=["ref_id", "doc_id", "text"], filter=f"ref_id IN ({quoted})").to_pylist()
    by_id = {row["ref_id"]: row for row in rows}
    return [{"rank": i + 1, "score": round(score, 4), **by_id[rid]} for i, (rid, score) in enumerate(hits)]
