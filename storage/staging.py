"""Per-shard intermediate files: the unit of resumption of a long job.

A shard's output appears all at once, so after a crash every output file there is complete: a
rerun skips the shards whose file exists and redoes the rest, and nothing is counted twice. On a
filesystem that is a write to a temporary name and a rename; on an object store a single PUT is
already all-or-nothing (and a rename would be a copy), so the object is written in place.

Paths are local paths or URIs alike (storage/layout.py: `upath`); pyarrow reads and writes
either.
"""

from __future__ import annotations

import os
import shutil
import uuid
from contextlib import contextmanager
from typing import Iterable, Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from storage.layout import upath


def _is_local(path) -> bool:
    return getattr(path, "protocol", "") in ("", "file", "local")


@contextmanager
def open_atomic(path, durable: bool = False) -> Iterator:
    """A binary file whose content appears at `path` whole when the block ends, or not at all.
    `durable`: on a local file system the bytes are also on disk (fsync) before the rename, for
    files a reader trusts after a power loss (the payload slab and its header)."""
    path = upath(path)
    if not _is_local(path):
        with path.open("wb") as f:  # one (multipart) upload: the object appears on close
            yield f
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        with tmp.open("wb") as f:
            yield f
            if durable:
                f.flush()
                os.fsync(f.fileno())
        if getattr(path, "protocol", ""):
            path.fs.mv(tmp.path, path.path)  # a file:// URI: fsspec's local rename
        else:
            os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_atomic(path, table: pa.Table) -> None:
    with open_atomic(path) as f:
        pq.write_table(table, f)


def write_bytes_atomic(path, data: bytes, durable: bool = False) -> None:
    with open_atomic(path, durable) as f:
        f.write(data)


def write_text_atomic(path, text: str, durable: bool = False) -> None:
    write_bytes_atomic(path, text.encode("utf-8"), durable)


def iter_batches(paths: Iterable, columns: list[str] | None = None, batch_size: int = 4096) -> Iterator[pa.RecordBatch]:
    """Stream the rows of several staged files, in the order given."""
    for path in paths:
        with upath(path).open("rb") as f:
            yield from pq.ParquetFile(f).iter_batches(batch_size=batch_size, columns=columns)


def read_table(path, columns: list[str] | None = None) -> pa.Table:
    with upath(path).open("rb") as f:
        return pq.read_table(f, columns=columns)


def remove(path) -> None:
    path = upath(path)
    if not getattr(path, "protocol", ""):
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists():
        path.fs.rm(path.path, recursive=True)
