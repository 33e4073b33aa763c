"""`m3 embed`: a retrieval vector for every reference (the `embeddings` table) and its ANN index.

    python -m jobs embed -c configs/demo.yaml

A sharded stage (jobs/stages/runner.py): Ray Data actors (one embedder each) embed row ranges of
`refs` into staging files; one commit makes the new table version, tagged; past a size
threshold an ANN index is built on it (cosine), the same index for the same vectors where
LanceDB allows (`build_reproducible_index`). The key covers the refs version and the embedder's
fingerprint: the same key is nothing to do, an unfinished one resumes. Vectors of unchanged
references made by the same embedder are copied from the previous table (the rebuild calls this
same function).

A lexical `retrieval.method` (bm25, hybrid: storage/lexical.py) adds each reference's text to
the table and a full-text (BM25) index on it, a commit after the vector index's: the version
returned, and published, is the one that has both. The key covers it (and the index's
tokenizer settings), so switching between vector and a lexical method rebuilds the table
(copying every vector, computing none), while bm25 <-> hybrid, the same table, is nothing to do
here (the pair stage's key covers the method itself). Vectors are computed for bm25 too: they
cost seconds with the default static embedder, hybrid and vector serving can then be tried on
the same build without re-embedding, and the table keeps one shape for every reader that checks
its embedder lineage (pair, serving, publish, verify).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Callable

import lance
import pyarrow as pa
import pyarrow.compute as pc

from jobs.config import Config, config_hash
from jobs.stages.runner import Reuse, ShardedStage, run_stage
from pipelines.embed_step import EMBEDDINGS_SCHEMA, EmbedShards
from pipelines.embedder import load_embedder
from storage.bank import Bank
from storage.lexical import FTS_PARAMS, TEXT_COLUMN, build_fts_index, fts_info, retrieve, uses_text
from storage.lock import writes_bank
from storage.vectors import AnnParams, build_index, index_info, update_index


def embed_key(cfg: Config, bank: Bank, embedder) -> str:
    """What an embeddings table is a function of."""
    parts = {
        "embedder": embedder.id,
        "refs": bank.metadata("refs").get("ingest_key"),
        "refs_version": bank.table("refs").version,
        "per": cfg.retrieval.refs_per_shard,
    }
    if uses_text(cfg.retrieval.method):  # absent for vector: the keys of vector banks are as they were
        parts["fulltext"] = FTS_PARAMS
    return config_hash(parts)


def with_text_as_now(refs: lance.LanceDataset, text: bool):
    """Reuse.check of the embed stage: old rows copied into a table with (without) the text
    column get it from refs (lose it), so switching the method copies every vector instead of
    computing it again."""

    def check(old: lance.LanceDataset):
        if (TEXT_COLUMN in old.schema.names) == text:
            return None
        if not text:
            return lambda batch, start: batch.drop_columns([TEXT_COLUMN])

        def add(batch: pa.RecordBatch, start: int) -> pa.RecordBatch:
            ids = batch.column("ref_id").to_pylist()
            t = refs.to_table(columns=["ref_id", TEXT_COLUMN], filter=pc.field("ref_id").isin(ids))
            by_id = dict(zip(t.column("ref_id").to_pylist(), t.column(TEXT_COLUMN).to_pylist()))
            # a reference no longer in refs has no text; its row is not kept (jobs/stages/kept_rows.py Kept)
            return batch.append_column(TEXT_COLUMN, pa.array([by_id.get(r, "") for r in ids], pa.string()))

        return add

    return check


def embed_stage(cfg: Config, bank: Bank, embedder, label: str = "embed") -> ShardedStage:
    r = cfg.retrieval
    text = uses_text(r.method)
    refs_meta, refs = bank.metadata("refs"), bank.dataset("refs")
    key = embed_key(cfg, bank, embedder)
    return ShardedStage(
        name="embed",
        table="embeddings",
        key_field="embed_key",
        key=key,
        schema=EMBEDDINGS_SCHEMA(embedder.dim, text),
        input_uri=refs.uri,
        n_rows=refs.count_rows(),
        rows_per_shard=r.refs_per_shard,
        actor=EmbedShards,
        actor_kw={"spec": r.embedder, "batch_size": r.batch_size, **({"text": True} if text else {})},
        actors=r.actors,
        threads=r.threads_per_actor,
        reuse=Reuse("embedder", embedder.id, check=with_text_as_now(refs, text)),
        lineage=lambda files: {
            "stage": label,
            "embed_key": key,
            "embedder": embedder.lineage(),
            "tokenizer_hash": refs_meta.get("tokenizer_hash"),
            "ingest_key": refs_meta.get("ingest_key"),
            "config": cfg.as_dict(),
            **({"fulltext": {"column": TEXT_COLUMN, **FTS_PARAMS}} if text else {}),
        },
    )


@writes_bank("embed")  # the bank's write lock (storage/lock.py), reentrant under m3 run / rebuild
def run_embed(cfg: Config, label: str = "embed", note: Callable[[str], None] = print) -> dict:
    """Returns the embeddings `version` written or found up to date (after its index), and the
    `refs_version` it was built from (a rebuild publishes exactly these)."""
    bank = Bank.of(cfg)
    bank.require("refs")
    r = cfg.retrieval
    embedder = load_embedder(r.embedder)  # fails here, before Ray, if the model is missing
    refs_version = bank.table("refs").version
    stage = embed_stage(cfg, bank, embedder, label)
    out = {**run_stage(stage, bank, cfg.ray, note), "refs_version": refs_version}
    text = uses_text(r.method)
    if out["status"] == "up_to_date":
        table = bank.table("embeddings")
        if stage.n_rows >= r.index_threshold and (index_info(table) or {}).get("unindexed_rows", 1):
            # killed between the data commit and the index's: the index brought up to date now
            # (a kept index gets its delta, a lost one is built), the version after it published
            out["index"] = build_reproducible_index(
                bank, "embeddings", stage.n_rows, r.index_threshold, r.index_type, incremental=True
            )
            out["version"] = bank.table("embeddings").version
            note(f"embed: index brought up to date on embeddings version {out['version']} ({out['index']['update']})")
        if text and fts_info(bank.table("embeddings")) is None:  # killed between the data and index commits
            out.update(fulltext=build_fts_index(bank.table("embeddings")), version=bank.table("embeddings").version)
            note(f"embed: full-text index built on embeddings version {out['version']} (it had none)")
        return out
    # the index is a commit of its own (the version a publish names is the one after it); a commit
    # that kept the previous index (an incremental rebuild's Update) gets a delta index over its
    # new rows where storage.vectors.update_plan allows, else the index is built whole
    index = build_reproducible_index(
        bank, "embeddings", stage.n_rows, r.index_threshold, r.index_type, incremental=True
    )
    out.update(index=index, references=stage.n_rows)
    if index.get("index"):  # the index's commit (ours: we hold the bank's write lock) is the version to publish
        out["version"] = bank.table("embeddings").version
    if text:  # the full-text index, one more commit: the version published has both indexes
        out.update(fulltext=build_fts_index(bank.table("embeddings")), version=bank.table("embeddings").version)
    note(
        f"embed: {stage.n_rows:,} vectors ({embedder.id}, dim {embedder.dim}), {out['computed']:,} computed, "
        f"as embeddings version {out['version']} in {out['seconds']:.1f} s "
        f"({out['computed'] / max(out['compute_seconds'], 1e-9):,.1f} refs/s); index: {_index_note(index)}"
        + (f"; full-text index (BM25) on {out['fulltext']['rows']:,} texts" if text else "")
    )
    return out


# Why a child process with one Rayon thread: LanceDB builds the HNSW graph by inserting vectors
# from parallel threads, so two builds over the same vectors give different graphs and some
# queries other neighbours (the demo bank, 18,218 static-minilm vectors: 159 of the pair stage's
# 4,424 queries got another top 8, 10 chunks another neighbour; BENCHMARKS.md, "Does memory
# help?"). With one thread the graph is a function of the vectors (lance seeds the level draws):
# 5 of 5 builds answered all 4,424 queries alike. Rayon reads RAYON_NUM_THREADS once, when its
# pool starts, and this process's pool may have started already (ingest, search): hence a child.
# Only one-partition IVF_HNSW_SQ indexes (< 1M rows) are made reproducible: k-means (IVF_PQ, or
# HNSW partitions) draws its initial centroids unseeded, one thread or not (measured: two
# one-thread IVF_PQ builds answered 1,298 of the 4,424 queries differently).
# The incremental update (storage.vectors.update_index: a delta index over the new fragments) runs
# in the same child: its graph is built over the new vectors alone, with the same seeded one-thread
# insertion, and the rows are assigned to the old index's centroids and SQ bounds (no k-means), so
# the same previous index and the same new vectors give the same index (measured:
# tests/storage/test_vectors_update.py). It is not the index a whole build over the same table
# would give (that is one graph, this the old graph plus a delta): "reproducible" then means a
# function of the previous index and the commit, which the report's "update" says.
_BUILD = """import json, sys
from storage.bank import Bank
from storage.vectors import build_index, update_index
a = json.loads(sys.argv[1])
build = update_index if a.get("incremental") else build_index
print(json.dumps(build(Bank(a["uri"]).table(a["table"]), a["n_rows"], threshold=a["threshold"],
                       index_type=a["index_type"])))
"""


def reproducible(n_rows: int, threshold: int, index_type: str) -> bool:
    """Whether `build_reproducible_index` gives the same index for the same vectors (exact search
    below the threshold has no index to differ)."""
    return n_rows < threshold or (
        index_type == "IVF_HNSW_SQ" and AnnParams.for_table(n_rows, 1, index_type).num_partitions == 1
    )


def build_reproducible_index(
    bank: Bank, table: str, n_rows: int, threshold: int, index_type: str, incremental: bool = False
) -> dict:
    """`storage.vectors.build_index` on a bank's table, in a one-thread child process where
    that makes the index a function of the table's vectors; the report says which
    ("reproducible"). incremental: `storage.vectors.update_index` instead, which extends an index
    the last commit kept by a delta where its policy allows (the report's "update" says which
    ran, "indexed_rows" how many rows it indexed)."""
    build = update_index if incremental else build_index
    if n_rows < threshold or not reproducible(n_rows, threshold, index_type):
        out = build(bank.table(table), n_rows, threshold=threshold, index_type=index_type)
        return {**out, "reproducible": reproducible(n_rows, threshold, index_type)}
    root = str(Path(__file__).resolve().parents[2])  # the project, importable in the child as here
    env = {
        **os.environ,
        "RAYON_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p),
    }
    args = json.dumps(
        {
            "uri": bank.uri,
            "table": table,
            "n_rows": int(n_rows),
            "threshold": int(threshold),
            "index_type": index_type,
            **({"incremental": True} if incremental else {}),
        }
    )
    done = subprocess.run([sys.executable, "-c", _BUILD, args], env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(
            f"building the {index_type} index of {table} failed (exit {done.returncode}): {done.stderr.strip()[-2000:]}"
        )
    out = json.loads(done.stdout.strip().splitlines()[-1])
    if out.get("update") == "incremental":  # a function of the index before and the commit (above _BUILD)
        out["reproducible_from"] = "the previous index and the new rows"
    return {**out, "reproducible": True}


def _index_note(index: dict) -> str:
    if not index.get("index"):
        return str(index.get("reason"))
    if "update" not in index:
        return index["index"]
    return f"{index['index']}, {index['update']} ({index['indexed_rows']:,} rows indexed: {index['reason']})"


def search_text(cfg: Config, text: str, k: int = 5, exact: bool = False, bank: Bank | None = None) -> list[dict]:
    """The top-k references for a query text by `retrieval.method`, with their text. bank: a
    pinned one (storage.builds.pinned_bank: `m3 search --build N`); default the latest tables."""
    from storage.lexical import require_fts
    from storage.vectors import search

    bank = bank or Bank.of(cfg)
    bank.require("embeddings")
    table, method = bank.table("embeddings"), cfg.retrieval.method
    require_fts(table, method)
    embedder = load_embedder(cfg.retrieval.embedder)
    embedder.check_lineage(bank.metadata("embeddings")["embedder"])

    def dense(texts: list[str], k: int) -> list[list[tuple[str, float]]]:
        return search(table, embedder.embed(texts), k=k, exact=exact)

    hits = retrieve(method, [text], k, table=table, vector_hits=dense)[0]
    ids = [h[0] for h in hits]
    quoted = ", ".join("'" + i.replace("'", "''") + "'" for i in ids) or "''"
    rows = (
        bank.dataset("refs").to_table(columns=["ref_id", "doc_id", "text"], filter=f"ref_id IN ({quoted})").to_pylist()
    )
    by_id = {row["ref_id"]: row for row in rows}
    # score: cosine similarity (vector), BM25 (bm25) or the RRF sum (hybrid): storage/lexical.py
    return [{"rank": i + 1, "score": round(score, 4), **by_id[rid]} for i, (rid, score) in enumerate(hits)]
