"""Stage 2 of ingestion: dedup decisions, one hash partition per task, then one vectorized merge.

Each partition holds every occurrence of its keys (written by the clean step), so grouping equal
keys inside it is exact. Partition outputs hold only duplicates, a small fraction of the corpus;
merging them is a few numpy passes over that fraction (no union-find, no per-document Python).

A document that is both an exact and a near duplicate is reported as exact.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
from upath import UPath

from pipelines.clean_step import KIND_BAND, KIND_EXACT
from pipelines.dedup import bucket_collisions, exact_duplicates, merge_min, resolve_kept
from storage.layout import upath
from storage.staging import read_table, write_atomic

DUPS = pa.schema([pa.field("rank", pa.int64()), pa.field("pointer", pa.int64()), pa.field("kind", pa.int8())])
REASON = {KIND_EXACT: "duplicate_exact", KIND_BAND: "duplicate_near"}


def partition_output(out_dir, p: int) -> UPath:
    return upath(out_dir) / "dedup" / f"p={p:04d}.parquet"


def dedup_partition(p: int, out_dir: str | UPath) -> int:
    """Group one partition's keys; write (duplicate rank, earlier rank, kind). Returns #rows."""
    out_dir = upath(out_dir)
    files = sorted((out_dir / "keys" / f"p={p:04d}").glob("*.parquet"))
    table = pa.concat_tables([read_table(f) for f in files]) if files else None
    parts = []
    if table is not None and table.num_rows:
        key = table["key"].to_numpy()
        rank = table["rank"].to_numpy()
        kind = table["kind"].to_numpy()
        for k, group in ((KIND_EXACT, exact_duplicates), (KIND_BAND, bucket_collisions)):
            sel = kind == k
            dup, pointer = group(key[sel], rank[sel])
            parts.append(
                pa.table({"rank": dup, "pointer": pointer, "kind": np.full(len(dup), k, dtype=np.int8)}, schema=DUPS)
            )
    result = pa.concat_tables(parts) if parts else DUPS.empty_table()
    write_atomic(partition_output(out_dir, p), result)
    return result.num_rows


def resolve(out_dir: str | UPath, partitions: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Merge the partitions: (duplicate ranks sorted, the kept twin of each, kind of each)."""
    tables = [read_table(partition_output(out_dir, p)) for p in range(partitions)]
    table = pa.concat_tables(tables) if tables else DUPS.empty_table()
    rank, pointer, kind = (table[c].to_numpy() for c in ("rank", "pointer", "kind"))
    exact = kind == KIND_EXACT
    # An exact key lives in one partition only, so exact rows are already one per duplicate.
    ex_rank, ex_ptr = rank[exact], pointer[exact]
    # A document's band keys spread over partitions: keep its earliest collider overall.
    band = kind == KIND_BAND
    nr_rank, nr_ptr = merge_min([rank[band]], [pointer[band]])
    near_only = ~np.isin(nr_rank, ex_rank)
    all_rank = np.concatenate([ex_rank, nr_rank[near_only]])
    all_ptr = np.concatenate([ex_ptr, nr_ptr[near_only]])
    all_kind = np.concatenate(
        [np.full(len(ex_rank), KIND_EXACT, np.int8), np.full(int(near_only.sum()), KIND_BAND, np.int8)]
    )
    order = np.argsort(all_rank, kind="stable")
    all_rank, all_ptr, all_kind = all_rank[order], all_ptr[order], all_kind[order]
    twins = resolve_kept(all_rank, all_ptr)
    return all_rank, twins, all_kind
