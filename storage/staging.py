"""Per-shard intermediate files: the unit of resumption of a long job.

A shard's output appears all at once (written to a temporary name, then renamed) so after a
crash every output file on disk is complete: a rerun skips the shards whose file exists and
redoes the rest, and nothing is counted twice.
"""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path
from typing import Iterable, Iterator

import pyarrow as pa
import pyarrow.parquet as pq


def write_atomic(path: str | Path, table: pa.Table) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    pq.write_table(table, tmp)
    os.replace(tmp, path)


def write_text_atomic(path: str | Path, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def iter_batches(paths: Iterable[str | Path], columns: list[str] | None = None,
                 batch_size: int = 4096) -> Iterator[pa.RecordBatch]:
    """Stream the rows of several staged files, in the order given."""
    for path in paths:
        yield from pq.ParquetFile(path).iter_batches(batch_size=batch_size, columns=columns)


def remove(path: str | Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
