"""A new table version that deletes some rows and appends others, sharing every unchanged file.

An incremental rebuild changes a few percent of a derived table's rows. Rewriting the table made
each kept build a full copy; instead the new version is one Lance commit (`LanceOperation.Update`)
that adds deletion vectors to the old fragments for the rows that go (their data files stay, and
stay the old version's) and appends new fragments holding the rows that come. Indexes stay: the
old fragments stay indexed (deleted rows are filtered at query time), the new ones are not yet.

The lineage rides in the schema metadata (storage/bank.py), which an Update cannot set: a second,
metadata-only commit (`UpdateConfig`) follows. The Update's transaction carries the commit's key
(`PROPERTY`), so a job killed between the two commits finds its rows committed and writes only
the metadata (`finish`), instead of deleting and appending them a second time.

Row addresses are Lance's `_rowaddr` (fragment id << 32 | physical offset in the fragment), as a
scan `with_row_address=True` gives them.
"""

from __future__ import annotations

import json
from typing import Callable, Iterable, Iterator

import lance
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from lance import LanceOperation, Transaction
from lance.fragment import write_fragments

from storage.freed_memory import return_freed_memory

PROPERTY = "m3.commit"  # the Update transaction's property: the key of the commit it belongs to
META = "m3"  # the schema metadata key the lineage lives under (storage/bank.py META_KEY)


def by_fragment(addresses: np.ndarray) -> dict[int, list[int]]:
    """Row addresses grouped as {fragment id: sorted physical offsets}."""
    a = np.unique(np.asarray(addresses, dtype=np.uint64))
    frags = (a >> np.uint64(32)).astype(np.int64)
    offsets = (a & np.uint64(0xFFFFFFFF)).astype(np.int64)
    return {int(f): offsets[frags == f].tolist() for f in np.unique(frags)}


def commit_update(
    uri: str, read_version: int, deleted: np.ndarray, schema: pa.Schema, batches: Iterable[pa.RecordBatch], key: str
) -> int:
    """One version of the table at `uri` made from version `read_version`: the rows at
    `deleted` (row addresses) gone, the rows of `batches` (cast to `schema`) appended, then the
    schema metadata of `schema` (the lineage); returns the version after both commits."""
    return_freed_memory()  # the writer's buffers leave the process (storage/freed_memory.py)
    ds = lance.dataset(uri, version=read_version)
    updated, removed = [], []
    for fid, offsets in by_fragment(deleted).items():
        frag = ds.get_fragment(fid).delete_rows(offsets)
        (removed.append(fid) if frag is None else updated.append(frag))

    new = write_fragments(
        pa.RecordBatchReader.from_batches(schema, as_schema(schema, batches)),
        uri,
        schema=schema,
        data_storage_version=ds.data_storage_version,
    )
    op = LanceOperation.Update(removed_fragment_ids=removed, updated_fragments=updated, new_fragments=new)
    done = lance.LanceDataset.commit(
        uri, Transaction(read_version, op, transaction_properties={PROPERTY: key}), read_version=read_version
    )
    return _set_metadata(uri, done.version, schema)


def as_schema(schema: pa.Schema, batches: Iterable[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
    """The non-empty batches, each cast to the table's schema (staged parquet may differ in
    string widths or metadata; the table's schema wins)."""
    for batch in batches:
        if batch.num_rows:
            yield batch if batch.schema == schema else batch.cast(schema)


def finish(uri: str, key: str, schema: pa.Schema) -> int | None:
    """After a job killed between an Update and its metadata commit: if the table's latest
    version is the Update of the commit `key`, write its metadata and return the version; else
    None (nothing of that commit is on disk)."""
    ds = lance.dataset(uri)
    tx = ds.read_transaction(ds.version)
    if tx is None or (tx.transaction_properties or {}).get(PROPERTY) != key:
        return None
    return _set_metadata(uri, ds.version, schema)


def _set_metadata(uri: str, version: int, schema: pa.Schema) -> int:
    meta = (schema.metadata or {}).get(META.encode())
    if meta is None:
        return version
    value = meta.decode() if isinstance(meta, bytes) else meta
    json.loads(value)  # the lineage is JSON; a torn value is refused before it is committed
    op = LanceOperation.UpdateConfig(schema_metadata_updates=LanceOperation.UpdateMap({META: value}))
    return lance.LanceDataset.commit(uri, op, read_version=version).version


def row_digests(batch: pa.RecordBatch, columns: list[str]) -> pa.Array:
    """A 16-byte digest per row of `columns`: what says two rows are the same row."""
    import hashlib

    parts = [batch.column(c).cast(pa.string()).fill_null("\x00") for c in columns]
    joined = pc.binary_join_element_wise(*parts, "\x1f").to_pylist()
    return pa.array([hashlib.blake2b(s.encode(), digest_size=16).digest() for s in joined], pa.binary(16))


def diff_update(
    uri: str,
    read_version: int,
    schema: pa.Schema,
    batches: Callable[[], Iterable[pa.RecordBatch]],
    identity: list[str],
    key: str,
) -> int:
    """The table's new contents, `batches()` (called twice: staged files, not a stream held in
    memory), committed as an update of `read_version`: rows already there (the same `identity`
    columns) stay in their files, the others are appended, old rows not among the new deleted."""
    old = lance.dataset(uri, version=read_version)
    old_digests, old_addr = [], []
    for b in old.to_batches(columns=identity, with_row_address=True):
        old_digests.append(row_digests(b, identity))
        old_addr.append(b.column("_rowaddr").to_numpy())
    old_d = pa.concat_arrays(old_digests) if old_digests else pa.array([], pa.binary(16))
    addr = np.concatenate(old_addr) if old_addr else np.zeros(0, np.uint64)
    new_d = [row_digests(b, identity) for b in batches() if b.num_rows]
    new_all = pa.concat_arrays(new_d) if new_d else pa.array([], pa.binary(16))
    gone = addr[~np.asarray(pc.is_in(old_d, value_set=new_all).to_numpy(zero_copy_only=False), bool)]

    def appended():
        for b in batches():
            if b.num_rows:
                yield b.filter(pc.invert(pc.is_in(row_digests(b, identity), value_set=old_d)))

    return commit_update(uri, read_version, gone, schema, appended(), key)
