"""Stage 1 of ingestion, one shard at a time: read, normalize, filter, and compute dedup keys.

Everything here is per-document, so shards run in parallel on any number of workers. The
cross-document part of dedup (grouping equal keys) happens later, per hash partition: this step
writes each key into the partition file that will group it.

Outputs under `out_dir` (the docs file is written last: its presence means the shard is done):
    keys/p=NNNN/<shard>.parquet  (key, rank, kind)  kind 0 = exact key, 1 = LSH band key
    rejects/<shard>.parquet      bad input and quality rejects, with reasons
    docs/<shard>.parquet         the surviving documents, normalized
"""

from __future__ import annotations

from upath import UPath

import numpy as np
import pyarrow as pa

from pipelines.dedup import partition_of
from pipelines.filters import quality_reason
from pipelines.minhash import band_keys, signatures
from pipelines.normalize import content_hash, exact_dedup_key, normalize_text
from pipelines.readers import Shard, SourceFile, read_shard
from storage.schemas import REJECTS
from storage.layout import upath
from storage.staging import write_atomic

KIND_EXACT, KIND_BAND = 0, 1

STAGED_DOCS = pa.schema([
    pa.field("rank", pa.int64()),
    pa.field("doc_id", pa.string()),
    pa.field("source", pa.string()),
    pa.field("source_id", pa.string()),
    pa.field("text", pa.large_string()),
    pa.field("content_hash", pa.string()),
    pa.field("n_chars", pa.int64()),
    pa.field("meta", pa.string()),
    pa.field("in_training", pa.bool_()),
    pa.field("in_bank", pa.bool_()),
    pa.field("training_reason", pa.string()),
])
KEYS = pa.schema([pa.field("key", pa.int64()), pa.field("rank", pa.int64()), pa.field("kind", pa.int8())])


def docs_path(out_dir, shard_id: str) -> UPath:
    return upath(out_dir) / "docs" / f"{shard_id}.parquet"


def clean_shard(shard: Shard, files: list[SourceFile], corpus, quality, dedup, out_dir: str | UPath,
                bank_quality=None) -> dict:
    """Process one shard; returns its counts. Idempotent: rerunning rewrites identical files.

    A document is kept when it passes the training filter (`quality`) or the bank's
    (`bank_quality`, None = the same); `in_training` and `in_bank` say which. A record that
    passes neither is a reject, with the training filter's reason."""
    out_dir = upath(out_dir)
    docs: dict[str, list] = {name: [] for name in STAGED_DOCS.names}
    rejects: dict[str, list] = {name: [] for name in REJECTS.names}
    records = 0
    for rec in read_shard(shard, files, corpus.text_key, corpus.id_key, corpus.max_record_bytes):
        records += 1
        stage, reason, text = "read", rec.reason, None
        if reason is None and len(rec.text) > quality.max_chars:
            stage, reason = "quality", "too_long"  # decided before normalizing megabytes
        elif reason is None:
            text = normalize_text(rec.text)
            stage, reason = "quality", quality_reason(text, quality)
        training_reason, in_bank = reason, reason is None
        if stage == "quality" and bank_quality is not None and text is not None:
            in_bank = quality_reason(text, bank_quality) is None
            if in_bank:
                reason = None  # the bank keeps it; training does not
        if reason is not None:
            for name, value in (("doc_id", rec.doc_id), ("source", rec.source), ("source_id", rec.source_id),
                                ("reason", reason), ("stage", stage), ("duplicate_of", None),
                                ("raw_prefix", rec.raw_prefix or (rec.text or "")[:200]), ("rank", rec.rank)):
                rejects[name].append(value)
            continue
        for name, value in (("rank", rec.rank), ("doc_id", rec.doc_id), ("source", rec.source),
                            ("source_id", rec.source_id), ("text", text), ("content_hash", content_hash(text)),
                            ("n_chars", len(text)), ("meta", rec.meta), ("in_training", training_reason is None),
                            ("in_bank", in_bank), ("training_reason", training_reason)):
            docs[name].append(value)

    _write_keys(docs["text"], np.asarray(docs["rank"], dtype=np.int64), dedup, out_dir, shard.shard_id)
    write_atomic(out_dir / "rejects" / f"{shard.shard_id}.parquet", pa.table(rejects, schema=REJECTS))
    write_atomic(docs_path(out_dir, shard.shard_id), pa.table(docs, schema=STAGED_DOCS))
    return {"shard": shard.shard_id, "records": records, "kept": len(docs["rank"]),
            "rejected": len(rejects["rank"]), "bytes": sum(docs["n_chars"]),
            "bank_only": sum(not t for t in docs["in_training"]), "training_only": sum(not b for b in docs["in_bank"])}


def _write_keys(texts: list[str], ranks: np.ndarray, dedup, out_dir: UPath, shard_id: str) -> None:
    keys, kinds, key_ranks = [], [], []
    if dedup.exact:
        keys.append(np.fromiter((exact_dedup_key(t) for t in texts), dtype=np.int64, count=len(texts)))
        kinds.append(np.full(len(texts), KIND_EXACT, dtype=np.int8))
        key_ranks.append(ranks)
    if dedup.near and texts:
        bands = band_keys(signatures(texts, dedup.minhash), dedup.minhash)  # (n, bands)
        keys.append(bands.reshape(-1))
        kinds.append(np.full(bands.size, KIND_BAND, dtype=np.int8))
        key_ranks.append(np.repeat(ranks, bands.shape[1]))
    key = np.concatenate(keys) if keys else np.zeros(0, np.int64)
    kind = np.concatenate(kinds) if kinds else np.zeros(0, np.int8)
    rank = np.concatenate(key_ranks) if key_ranks else np.zeros(0, np.int64)
    # Exact and band keys share a partitioning but never a group: `kind` keeps them apart.
    part = partition_of(key, dedup.partitions)
    order = np.argsort(part, kind="stable")
    part, key, kind, rank = part[order], key[order], kind[order], rank[order]
    bounds = np.searchsorted(part, np.arange(dedup.partitions + 1))
    for p in range(dedup.partitions):
        lo, hi = bounds[p], bounds[p + 1]
        table = pa.table({"key": key[lo:hi], "rank": rank[lo:hi], "kind": kind[lo:hi]}, schema=KEYS)
        write_atomic(out_dir / "keys" / f"p={p:04d}" / f"{shard_id}.parquet", table)
