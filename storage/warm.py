"""Memories written back at serving: what a store encoded for a cold reference, kept for later reads.

A bank may hold references without memories (`encode.cold: true`, or references added since the
last encode): the first time one is retrieved, the `MemoryStore` encodes it with the serving model
and writes the rows of that fetch back here, one Parquet file per write-back, under

    <bank>/_warm/<key>/<time>-<uuid>.parquet      (rows of the `memories` schema)

where `key` names everything a stored memory depends on: the model hash, the codec (and its
quantizer) and the sparsity. The encode stage (`m3 encode`, `m3 rebuild`) reuses these rows like
its own old rows, by content hash and model hash, instead of encoding those references again.

Why this is safe beside a rebuild, with no lock:
- a write-back only ever creates a new file, whole or not at all (storage/staging.py: a rename
  on a filesystem, one PUT on an object store), under a name no other writer uses; it never opens
  a Lance table for writing and never touches `_live.json`: the live build's tables cannot change;
- nothing modifies or deletes a written file, so a reader (the encode stage, another server)
  never sees a torn one: the encode stage lists the directory once and reads what it listed; a
  file written after that listing is picked up by the next build and served from here meanwhile;
- the directory is chosen by the key, and every row carries its model hash and content hash,
  which readers check: a store of another model, codec or sparsity never reads these rows, and a
  row of a reference whose text has changed since is ignored (and re-encoded).
Two servers encoding the same reference write the same bytes twice; readers keep one.
"""

from __future__ import annotations

import hashlib
import json
import time
import uuid
from typing import TYPE_CHECKING

import pyarrow as pa
import pyarrow.compute as pc

from storage.schemas import MEMORIES
from storage.staging import read_table, write_atomic

if TYPE_CHECKING:
    from storage.bank import Bank


def warm_key(model_hash: str, codec: str, quantizer_hash: str | None, sparsity: dict | None) -> str:
    """The write-back directory of memories made by this model, codec and sparsity."""
    blob = json.dumps({"codec": codec, "quantizer": quantizer_hash, "sparsity": sparsity}, sort_keys=True)
    return f"{model_hash}-{hashlib.blake2b(blob.encode(), digest_size=6).hexdigest()}"


def key_of(meta: dict) -> str:
    """The warm key of a memories table, from its lineage."""
    return warm_key(meta.get("model_hash"), meta.get("codec"), meta.get("quantizer_hash"), meta.get("sparsity"))


def warm_files(bank: Bank, key: str) -> list:
    d = bank.layout.warm(key)
    if not d.exists():
        return []
    return sorted(p for p in d.iterdir() if p.name.endswith(".parquet") and not p.name.startswith("."))


def write_warm(bank: Bank, key: str, rows: pa.Table):
    path = bank.layout.warm(key) / f"{time.time_ns():020d}-{uuid.uuid4().hex}.parquet"
    write_atomic(path, rows.cast(MEMORIES))
    return path


def read_warm(
    bank: Bank, key: str, model_hash: str, columns: list[str] | None = None, files: list | None = None
) -> pa.Table:
    """Every written-back row of `key` made by `model_hash`, one per (ref_id, content_hash)."""
    files = warm_files(bank, key) if files is None else files
    cols = list(columns or MEMORIES.names)
    need = list(dict.fromkeys(cols + ["ref_id", "content_hash", "model_hash"]))
    parts = [read_table(f, columns=need) for f in files]
    if not parts:
        return pa.table({c: pa.array([], MEMORIES.field(c).type) for c in cols})
    t = pa.concat_tables(parts)
    t = t.filter(pc.equal(t.column("model_hash"), model_hash))
    keys = pc.binary_join_element_wise(t.column("ref_id"), t.column("content_hash"), "\x1f").to_pylist()
    first = sorted({k: i for i, k in reversed(list(enumerate(keys)))}.values())
    return t.take(pa.array(first, pa.int64())).select(cols)
