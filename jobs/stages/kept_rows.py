"""How a stage's new version keeps the old rows it reuses (jobs/stages/runner.py): kept in place
by an update of the old version (`commit_shared`: deletion vectors for the rows that go, the
computed rows appended, every unchanged file shared with the builds before; storage/table_delta.py),
or, where the columns changed or nothing is kept, copied into a full write (`copied`).

Which rows are kept (`Kept`): one per reference whose current content hash and producer they
carry. A row `Reuse.check` repairs (encode: a payload that differs from the crc32 its slab
recorded, jobs/stages/encode.py `checked_copy`) is rewritten and its damaged copy deleted.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator

import lance
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from upath import UPath

from pipelines.delta import Delta, ref_key
from storage.bank import Bank
from storage.staging import iter_batches


@dataclass(frozen=True)
class Reuse:
    """How the old rows of a table derived from `refs` are kept (see the module docstring)."""

    producer_column: str  # "model_hash", "embedder": who made a row
    producer: str  # the current producer; rows of another are recomputed
    table_ok: bool = True  # table-level settings (codec, quantizer, sparsity) unchanged
    # given the old table: None, or a function (batch of old rows, its first row) -> the batch to
    # copy, which checks the rows before they are copied into the new version (encode: against
    # the checksums of the old version's payload slab); None: rows are copied as read
    check: Callable[[lance.LanceDataset], Callable[[pa.RecordBatch, int], pa.RecordBatch] | None] | None = None


class Kept:
    """Which rows of the old table (and of rows made elsewhere, `extra`) a new version keeps:
    one row per reference whose current content hash and producer they carry, the first source
    first (two sources may both hold a row of a reference, one of them stale)."""

    def __init__(self, delta: Delta, reuse: Reuse, refs_uri: str, extra: bool):
        self.reuse, self.seen = reuse, set()  # seen: with two sources only
        self.keep, self.want = delta.keep_ids, None
        if extra:  # keep_ids name the references; their current content hash picks the row
            refs = lance.dataset(refs_uri).to_table(columns=["ref_id", "content_hash"])
            refs = refs.filter(pc.is_in(refs.column("ref_id"), value_set=self.keep))
            self.want = ref_key(refs.column("ref_id"), refs.column("content_hash"))

    def mask(self, batch: pa.RecordBatch) -> np.ndarray:
        if self.want is None:
            m = pc.is_in(batch.column("ref_id"), value_set=self.keep)
        else:
            m = pc.is_in(ref_key(batch.column("ref_id"), batch.column("content_hash")), value_set=self.want)
        m = pc.and_(m, pc.equal(batch.column(self.reuse.producer_column), self.reuse.producer))
        m = np.asarray(m.to_numpy(zero_copy_only=False), dtype=bool)
        if self.want is None:  # one source: a table holds one row per reference
            return m
        rows = np.flatnonzero(m)
        for i, rid in zip(rows.tolist(), batch.column("ref_id").take(pa.array(rows)).to_pylist()):
            if rid in self.seen:
                m[i] = False
            else:
                self.seen.add(rid)
        return m


def copied(
    old: lance.LanceDataset | None, extra: pa.Table | None, delta: Delta, reuse: Reuse, schema: pa.Schema, refs_uri: str
) -> Iterator[pa.RecordBatch]:
    """The old rows that are kept, a batch at a time (the bulk of the table is never in memory),
    then the kept rows made elsewhere (`extra`) for references the old table did not give; one
    row per reference. (A full write; `commit_shared` keeps the old rows in place instead.)"""
    if delta.unchanged == 0:
        return
    kept = Kept(delta, reuse, refs_uri, extra is not None)
    if old is not None and reuse.table_ok:
        for batch in old_batches(old, reuse):
            yield batch.filter(kept.mask(batch))
    if extra is not None:
        for batch in extra.select(schema.names).to_batches(max_chunksize=4096):
            yield batch.filter(kept.mask(batch))


def old_batches(old: lance.LanceDataset, reuse: Reuse) -> Iterator[pa.RecordBatch]:
    """The old table's rows in order, a batch at a time, each through `reuse.check` if any."""
    check = reuse.check(old) if reuse.check is not None else None
    start = 0
    for batch in old.to_batches():  # the Bank's dataset: batches bounded by row width
        yield batch if check is None else check(batch, start)
        start += batch.num_rows


def commit_shared(
    bank: Bank,
    target: tuple[str, pa.Schema, Reuse, str],
    old: lance.LanceDataset,
    extra: pa.Table | None,
    delta: Delta,
    files: list[UPath],
    lineage: dict,
) -> int:
    """The new version as one update of the old one (storage/table_delta.py): the old rows that
    are not kept get deletion vectors, the computed rows, the kept rows made elsewhere and any
    old row `reuse.check` repaired are appended; every other file is shared with the old
    version. The repaired rows are the only old rows read whole (without a check, only the key
    columns are scanned). `target`: the stage's table, schema, Reuse and input (refs) URI."""
    table, schema, reuse, refs_uri = target
    done = bank.finish_update(table, schema, lineage)  # killed between its two commits
    if done is not None:
        return done
    check = reuse.check(old) if reuse.check is not None else None
    columns = schema.names if check is not None else ["ref_id", "content_hash", reuse.producer_column]
    kept = Kept(delta, reuse, refs_uri, extra is not None)
    deleted, repaired, start = [], [], 0
    for batch in old.to_batches(columns=columns, with_row_address=True):
        addr = batch.column("_rowaddr").to_numpy()
        batch = batch.select(columns)
        mask = kept.mask(batch)
        if check is not None:
            fixed = check(batch, start)
            if fixed is not batch:  # rows the check replaced: rewritten, their old copies deleted
                redo = mask & changed_rows(batch, fixed)
                repaired.append(fixed.filter(redo))
                mask &= ~redo
        deleted.append(addr[~mask])
        start += batch.num_rows

    def appended() -> Iterator[pa.RecordBatch]:
        yield from repaired
        if extra is not None:
            for batch in extra.select(schema.names).to_batches(max_chunksize=4096):
                yield batch.filter(kept.mask(batch))
        yield from iter_batches(files, columns=schema.names)

    gone = np.concatenate(deleted) if deleted else np.zeros(0, np.uint64)
    return bank.update(table, schema, old.version, gone, appended(), lineage)


def same_columns(a: pa.Schema, b: pa.Schema) -> bool:
    """Whether a new version with schema `b` can share the files of one with schema `a` (the
    columns, not the metadata: a column added or dropped is a full write)."""
    return [(f.name, f.type) for f in a] == [(f.name, f.type) for f in b]


def changed_rows(a: pa.RecordBatch, b: pa.RecordBatch) -> np.ndarray:
    """Rows of two batches of the same rows that differ in any column."""
    out = np.zeros(a.num_rows, bool)
    for name in a.schema.names:
        x, y = a.column(name), b.column(name)
        if x.equals(y):
            continue
        try:
            out |= np.asarray(pc.not_equal(x, y).to_numpy(zero_copy_only=False), bool)
        except (pa.ArrowNotImplementedError, pa.ArrowInvalid):  # a type without comparison: all rewritten
            out[:] = True
    return out
