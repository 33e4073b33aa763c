"""Per-record memo of ingest's expensive per-document work, kept in the bank between builds.

A rebuild after a small edit re-reads the whole corpus, but a record whose text is unchanged
gets the same normalized text, quality decision, dedup keys (clean step) and the same token ids
and reference spans (chunk step) as last time: those come from the memo instead of being
recomputed. Only per-record *functions of the text and the config* are memoized; everything
positional or global (rank, doc_id, dedup winners, packing, ids of rows) is still derived in
this build, so a hit can never change a result. So is the role of a record's source
(corpus.roles): the clean memo keeps both filters' reasons, and the role is applied to them in
every build (pipelines/clean_step.decide), so changing a role re-decides the record.

    <bank>/_memo/current.json                 {"build": ingest key, "clean": cfg key, "chunk": cfg key}
    <bank>/_memo/<build>/<kind>/<shard>.parquet   one entry per record of the shard (hits copied)
    <bank>/_memo/<build>/<kind>.index.parquet     key -> (file, row), sorted by key

A build writes its own memo under its ingest key while it runs (never touching the one it
reads), and `publish` makes it current after the tables are committed, then deletes every
other build's memo: its size is one entry per record of the current corpus. A memo is used
only when its config key (the caller hashes every setting the memoized work depends on, plus
CODE below) equals this build's, so a memo written by another config is never read.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pyarrow as pa

from storage.bank import Bank
from storage.layout import upath
from storage.staging import read_table, remove, write_atomic, write_text_atomic

# The memoized work is the code of these modules: editing one invalidates every memo.
_SOURCES = ("normalize.py", "filters.py", "minhash.py", "chunking.py", "clean_step.py", "chunk_step.py", "memo.py")
CODE = hashlib.blake2b(
    b"".join((Path(__file__).parent / name).read_bytes() for name in _SOURCES), digest_size=8
).hexdigest()
KINDS = ("clean", "chunk")
KEY = pa.field("key", pa.binary(16), nullable=False)


def text_key(text: str) -> bytes:
    """The memo key of a record: BLAKE2b-128 of its text (raw text for clean, normalized for chunk)."""
    return hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=16).digest()


def _current(bank: Bank) -> dict:
    path = bank.layout.memo() / "current.json"
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (FileNotFoundError, ValueError):
        return {}


def source(bank: Bank, kind: str, cfg_key: str) -> str | None:
    """The memo directory a build may read for `kind`, or None (no memo, or another config's)."""
    cur = _current(bank)
    if not cur.get("build") or cur.get(kind) != cfg_key:
        return None
    return str(bank.layout.memo() / cur["build"] / kind)


def target(bank: Bank, build: str, kind: str) -> str:
    """Where this build writes its memo files for `kind`."""
    return str(bank.layout.memo() / build / kind)


def lookup(src: str | None, keys: list[bytes], columns: list[str]) -> dict[bytes, dict]:
    """The memo entries (key -> {column: value}) of those `keys` that `src` holds."""
    if src is None or not keys:
        return {}
    index_path = upath(src).parent / f"{upath(src).name}.index.parquet"
    if not index_path.exists():
        return {}
    index = read_table(index_path)
    known = np.asarray(index.column("key").to_pylist(), dtype="S16")
    if len(known) == 0:
        return {}
    want = np.unique(np.asarray(keys, dtype="S16"))
    pos = np.searchsorted(known, want).clip(max=len(known) - 1)
    hit = known[pos] == want
    files = index.column("file").to_numpy(zero_copy_only=False)[pos[hit]]
    rows = index.column("row").to_numpy()[pos[hit]]
    found: dict[bytes, dict] = {}
    for name in np.unique(files):
        sel = files == name
        table = read_table(upath(src) / name, columns=["key", *columns]).take(pa.array(rows[sel]))
        for entry in table.to_pylist():
            found[entry.pop("key")] = entry
    return found


def write(dst: str, shard_id: str, schema: pa.Schema, entries: dict[str, list]) -> None:
    """This shard's memo file (every entry it used or made), written before the shard's output
    so that a shard marked done always has its memo."""
    write_atomic(upath(dst) / f"{shard_id}.parquet", pa.table(entries, schema=schema))


def _index(dst, shard_ids: list[str]) -> pa.Table:
    keys, files, rows = [], [], []
    for shard_id in shard_ids:
        path = upath(dst) / f"{shard_id}.parquet"
        if not path.exists():  # a shard staged before the memo existed: fewer hits, never wrong ones
            continue
        col = read_table(path, columns=["key"]).column("key").to_pylist()
        keys.extend(col)
        files.extend([path.name] * len(col))
        rows.extend(range(len(col)))
    arr = np.asarray(keys, dtype="S16")
    _, first = np.unique(arr, return_index=True)  # sorted; equal texts share one entry
    return pa.table(
        {
            "key": pa.array([keys[i] for i in first], pa.binary(16)),
            "file": pa.array([files[i] for i in first], pa.string()),
            "row": pa.array([rows[i] for i in first], pa.int32()),
        }
    )


def publish(bank: Bank, build: str, cfg_keys: dict[str, str], shard_ids: list[str]) -> None:
    """Make this build's memo the current one (after its tables are committed), then drop every
    other build's: entries of records no longer in the corpus go with them."""
    root = bank.layout.memo()
    for kind in KINDS:
        write_atomic(root / build / f"{kind}.index.parquet", _index(target(bank, build, kind), shard_ids))
    write_text_atomic(root / "current.json", json.dumps({"build": build, **cfg_keys}, sort_keys=True))
    for child in root.iterdir():
        if child.name not in (build, "current.json"):
            remove(child)
