"""What an incremental rebuild has to do: compare the references with a table derived from them.

A derived row (a memory, an embedding) is still right when its reference still exists with the
same content hash and it was made by the same producer (model, codec; embedder): then it is
copied, not recomputed. Everything else in `refs` is computed; derived rows whose reference is
gone or changed are dropped. Pure Arrow, no Ray, no Lance: the rebuild job feeds it columns.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc


@dataclass(frozen=True)
class Delta:
    compute_rows: np.ndarray  # row numbers in refs to (re)compute, ascending
    keep_ids: pa.Array  # ref_ids whose old derived row is copied
    added: int  # references with no derived row before
    changed: int  # references whose content (or producer) changed
    removed: int  # derived rows whose reference is gone

    @property
    def unchanged(self) -> int:
        return len(self.keep_ids)

    @property
    def empty(self) -> bool:
        return len(self.compute_rows) == 0 and self.removed == 0

    def counts(self) -> dict:
        return {"added": self.added, "changed": self.changed, "removed": self.removed, "unchanged": self.unchanged}


def ref_key(ids: pa.Array, hashes: pa.Array) -> pa.Array:
    """ref_id and content hash as one value: a row is reusable when both match."""
    return pc.binary_join_element_wise(ids, hashes, "\x1f")


def plan_delta(refs: pa.Table, old: pa.Table | None, producer_ok: pa.Array | None = None) -> Delta:
    """`refs` and `old` have ref_id and content_hash columns; `producer_ok` (bool per old row)
    marks the old rows made by the current producer (None: all of them)."""
    if old is None or old.num_rows == 0:
        return Delta(np.arange(refs.num_rows), pa.array([], pa.string()), refs.num_rows, 0, 0)
    ref_ids = refs.column("ref_id").combine_chunks()
    ref_keys = ref_key(ref_ids, refs.column("content_hash").combine_chunks())
    old_ids = old.column("ref_id").combine_chunks()
    old_keys = ref_key(old_ids, old.column("content_hash").combine_chunks())
    if producer_ok is not None:
        old_keys = pc.filter(old_keys, producer_ok)
    reusable = pc.is_in(ref_keys, value_set=old_keys)  # same id, same content, same producer
    existed = pc.is_in(ref_ids, value_set=old_ids)
    compute = np.flatnonzero(~reusable.to_numpy(zero_copy_only=False))
    added = int(pc.sum(pc.invert(existed)).as_py() or 0)
    removed = int(pc.sum(pc.invert(pc.is_in(old_ids, value_set=ref_ids))).as_py() or 0)
    return Delta(compute, pc.filter(ref_ids, reusable), added, len(compute) - added, removed)
