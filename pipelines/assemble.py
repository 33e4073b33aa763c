"""Stage 4 of ingestion: turn staged shard files and dedup decisions into final table rows.

Everything streams shard file by shard file; the only state held is the dedup decisions, whose
size is the number of duplicates, not of documents.
"""

from __future__ import annotations

from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from upath import UPath

from pipelines.dedup_step import REASON
from storage.layout import upath
from storage.schemas import DOCUMENTS, REJECTS
from storage.staging import iter_batches


def staged(out_dir, kind: str, shard_ids: list[str]) -> list[UPath]:
    return [upath(out_dir) / kind / f"{s}.parquet" for s in shard_ids]


def is_dup(ranks: np.ndarray, dup_ranks: np.ndarray) -> np.ndarray:
    """Membership test against the sorted duplicate ranks."""
    if len(dup_ranks) == 0:
        return np.zeros(len(ranks), dtype=bool)
    pos = np.searchsorted(dup_ranks, ranks).clip(max=len(dup_ranks) - 1)
    return dup_ranks[pos] == ranks


def kept_documents(out_dir: UPath, shard_ids: list[str], dup_ranks: np.ndarray) -> Iterator[pa.RecordBatch]:
    for batch in iter_batches(staged(out_dir, "docs", shard_ids), columns=DOCUMENTS.names):
        keep = ~is_dup(batch.column("rank").to_numpy(), dup_ranks)
        if keep.any():
            yield batch.filter(pa.array(keep))


def kept_texts(out_dir: UPath, shard_ids: list[str], dup_ranks: np.ndarray) -> Iterator[str]:
    for batch in kept_documents(out_dir, shard_ids, dup_ranks):
        yield from batch.column("text").to_pylist()


def duplicate_rejects(
    out_dir: UPath, shard_ids: list[str], dup_ranks: np.ndarray, twins: np.ndarray, kinds: np.ndarray
) -> pa.Table:
    """The rejects rows of the duplicates, each naming the doc_id of its kept twin."""
    if len(dup_ranks) == 0:
        return REJECTS.empty_table()
    wanted = np.union1d(dup_ranks, twins)
    found: dict[str, list] = {"rank": [], "doc_id": [], "source": [], "source_id": [], "text": []}
    for batch in iter_batches(staged(out_dir, "docs", shard_ids), columns=list(found)):
        sel = is_dup(batch.column("rank").to_numpy(), wanted)
        if sel.any():
            part = batch.filter(pa.array(sel))
            for name in found:
                found[name].extend(part.column(name).to_pylist())
    by_rank = {r: i for i, r in enumerate(found["rank"])}
    rows = [by_rank[int(r)] for r in dup_ranks]
    return pa.table(
        {
            "doc_id": [found["doc_id"][i] for i in rows],
            "source": [found["source"][i] for i in rows],
            "source_id": [found["source_id"][i] for i in rows],
            "reason": [REASON[int(k)] for k in kinds],
            "stage": ["dedup"] * len(rows),
            "duplicate_of": [found["doc_id"][by_rank[int(t)]] for t in twins],
            "raw_prefix": [found["text"][i][:200] for i in rows],
            "rank": dup_ranks,
        },
        schema=REJECTS,
    )


def all_rejects(out_dir: UPath, shard_ids: list[str], dup_table: pa.Table) -> Iterator[pa.RecordBatch]:
    yield from iter_batches(staged(out_dir, "rejects", shard_ids))
    yield from dup_table.to_batches()


def reason_counts(batches) -> dict[str, int]:
    counts: dict[str, int] = {}
    for batch in batches:
        for item in pc.value_counts(batch.column("reason")).to_pylist():
            counts[item["values"]] = counts.get(item["values"], 0) + item["counts"]
    return dict(sorted(counts.items(), key=lambda kv: -kv[1]))
