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

import numpy as np
import pyarrow as pa
from upath import UPath

from pipelines import memo
from pipelines.dedup import partition_of
from pipelines.filters import quality_reason
from pipelines.minhash import band_keys, signatures
from pipelines.normalize import content_hash, exact_dedup_key, normalize_text
from pipelines.readers import RANK_BITS, Shard, SourceFile, read_shard
from storage.layout import upath
from storage.schemas import REJECTS
from storage.staging import write_atomic

KIND_EXACT, KIND_BAND = 0, 1

STAGED_DOCS = pa.schema(
    [
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
    ]
)
KEYS = pa.schema([pa.field("key", pa.int64()), pa.field("rank", pa.int64()), pa.field("kind", pa.int8())])


def docs_path(out_dir, shard_id: str) -> UPath:
    return upath(out_dir) / "docs" / f"{shard_id}.parquet"


# The clean memo: what normalize, the quality filters and the dedup keys make of one raw text.
CLEAN_MEMO = pa.schema(
    [
        memo.KEY,
        pa.field("text", pa.large_string()),  # normalized
        pa.field("content_hash", pa.string()),
        pa.field("training_reason", pa.string()),  # the training filter's reason, None = passes
        pa.field("bank_reason", pa.string()),  # the bank filter's reason, None = passes
        pa.field("exact_key", pa.int64()),  # None unless kept and dedup.exact
        pa.field("bands", pa.list_(pa.int64())),  # None unless kept and dedup.near
    ]
)
_MEMO_VALUES = CLEAN_MEMO.names[1:]


def clean_shard(
    shard: Shard,
    files: list[SourceFile],
    corpus,
    quality,
    dedup,
    out_dir: str | UPath,
    bank_quality=None,
    memo_src: str | None = None,
    memo_dst: str | None = None,
) -> dict:
    """Process one shard; returns its counts. Idempotent: rerunning rewrites identical files.

    Each record's file has a role (SourceFile.role, corpus.roles): `in_training` = its role
    allows training and it passes the training filter (`quality`); `in_bank` = its role allows
    the bank and it passes the bank's (`bank_quality`, None = the same). A document is kept when
    either holds. A record that its role's filters all refuse is a reject, with the reason of
    the filter its role applies: the bank filter's for a bank-only source, else the training
    filter's.

    With `memo_src` (pipelines/memo.py) a record whose raw text is in the memo takes its
    normalized text, both filters' reasons and dedup keys from there; `memo_dst` receives this
    shard's entries. The caller keys both by every setting the values depend on. The memo holds
    what the text and the settings decide, not the role: the role is applied to it here, in
    every build, so a changed role re-decides the record (the ingest key covers corpus.roles)."""
    out_dir = upath(out_dir)
    records = list(read_shard(shard, files, corpus.text_key, corpus.id_key, corpus.max_record_bytes))
    # Only records that reach normalization are memoized: the rest are decided by cheap tests.
    keyed = {
        i: memo.text_key(rec.text)
        for i, rec in enumerate(records)
        if rec.reason is None and len(rec.text) <= quality.max_chars
    }
    known = memo.lookup(memo_src, list(keyed.values()), _MEMO_VALUES)
    made = dict(known)
    fresh = [i for i, k in keyed.items() if k not in made]
    for i in fresh:
        key = keyed[i]
        if key in made:  # the same text twice in one shard
            continue
        text = normalize_text(records[i].text)
        training_reason = quality_reason(text, quality)
        bank_reason = training_reason if bank_quality is None else quality_reason(text, bank_quality)
        made[key] = {
            "text": text,
            "content_hash": content_hash(text),
            "training_reason": training_reason,
            "bank_reason": bank_reason,
            "exact_key": None,
            "bands": None,
        }
    _dedup_keys([made[k] for k in dict.fromkeys(keyed[i] for i in fresh)], dedup)

    docs: dict[str, list] = {name: [] for name in STAGED_DOCS.names}
    rejects: dict[str, list] = {name: [] for name in REJECTS.names}
    kept = []
    for i, rec in enumerate(records):
        entry = made.get(keyed.get(i))
        role = files[rec.rank >> RANK_BITS].role
        if entry is None:  # a read failure or too long: decided before normalizing megabytes
            stage, reason = ("read", rec.reason) if rec.reason is not None else ("quality", "too_long")
        else:
            in_training, in_bank, training_reason, reason = decide(entry, role)
            stage = "quality"
        if reason is not None:
            for name, value in (
                ("doc_id", rec.doc_id),
                ("source", rec.source),
                ("source_id", rec.source_id),
                ("reason", reason),
                ("stage", stage),
                ("duplicate_of", None),
                ("raw_prefix", rec.raw_prefix or (rec.text or "")[:200]),
                ("rank", rec.rank),
            ):
                rejects[name].append(value)
            continue
        for name, value in (
            ("rank", rec.rank),
            ("doc_id", rec.doc_id),
            ("source", rec.source),
            ("source_id", rec.source_id),
            ("text", entry["text"]),
            ("content_hash", entry["content_hash"]),
            ("n_chars", len(entry["text"])),
            ("meta", rec.meta),
            ("in_training", in_training),
            ("in_bank", in_bank),
            ("training_reason", training_reason),
        ):
            docs[name].append(value)
        kept.append(entry)

    _write_keys(kept, np.asarray(docs["rank"], dtype=np.int64), dedup, out_dir, shard.shard_id)
    if memo_dst is not None:
        entries = dict.fromkeys(keyed.values())
        memo.write(
            memo_dst,
            shard.shard_id,
            CLEAN_MEMO,
            {"key": list(entries), **{c: [made[k][c] for k in entries] for c in _MEMO_VALUES}},
        )
    write_atomic(out_dir / "rejects" / f"{shard.shard_id}.parquet", pa.table(rejects, schema=REJECTS))
    write_atomic(docs_path(out_dir, shard.shard_id), pa.table(docs, schema=STAGED_DOCS))
    return {
        "shard": shard.shard_id,
        "records": len(records),
        "kept": len(docs["rank"]),
        "rejected": len(rejects["rank"]),
        "bytes": sum(docs["n_chars"]),
        "memo_hits": len(known),
        "bank_only": sum(not t for t in docs["in_training"]),
        "training_only": sum(not b for b in docs["in_bank"]),
    }


# Why training left out a document of a bank-only source (documents.training_reason).
BANK_ROLE = "bank_only_source"


def decide(entry: dict, role: str) -> tuple[bool, bool, str | None, str | None]:
    """(in_training, in_bank, training_reason, reject reason) of a record whose text's filter
    reasons are in `entry`, in a file of `role`. training_reason says why training left a kept
    document out (its filter's reason, or BANK_ROLE); the reject reason is None for a document."""
    in_training = role != "bank" and entry["training_reason"] is None
    in_bank = role != "training" and entry["bank_reason"] is None
    training_reason = None if in_training else (BANK_ROLE if role == "bank" else entry["training_reason"])
    if in_training or in_bank:
        return in_training, in_bank, training_reason, None
    return False, False, None, entry["bank_reason"] if role == "bank" else entry["training_reason"]


def _dedup_keys(entries: list[dict], dedup) -> None:
    """Fill the dedup keys of freshly cleaned entries that a filter keeps (a reject needs none;
    whatever the role of a record, it keeps a subset of these)."""
    kept = [e for e in entries if e["bank_reason"] is None or e["training_reason"] is None]
    texts = [e["text"] for e in kept]
    if dedup.exact:
        for e in kept:
            e["exact_key"] = exact_dedup_key(e["text"])
    if dedup.near and texts:
        bands = band_keys(signatures(texts, dedup.minhash), dedup.minhash)  # (n, bands)
        for e, row in zip(kept, bands.tolist()):
            e["bands"] = row


def _write_keys(kept: list[dict], ranks: np.ndarray, dedup, out_dir: UPath, shard_id: str) -> None:
    keys, kinds, key_ranks = [], [], []
    if dedup.exact:
        keys.append(np.fromiter((e["exact_key"] for e in kept), dtype=np.int64, count=len(kept)))
        kinds.append(np.full(len(kept), KIND_EXACT, dtype=np.int8))
        key_ranks.append(ranks)
    if dedup.near and kept:
        bands = np.asarray([e["bands"] for e in kept], dtype=np.int64)  # (n, bands)
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
