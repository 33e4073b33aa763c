"""A payload slab per memories table version: the fixed-size payloads in one flat file.

A memory's payload has a fixed size per table (the codec's bytes for the table's memory shape),
so a version's payloads can sit end to end in one file, and a batch of memories is read with
one copy per row out of the page cache instead of a Lance `take` (~0.5 ms a call, BENCHMARKS.md
"Encode job and memory fetch"). The slab is a derived copy of the table, never the truth: it is
written after the encode stage commits (jobs/stages/encode.py) and after `m3 bank compact`
publishes a compacted version, and a reader uses it only after checking it against the table.

    <bank>/_slabs/memories/v<version>.payload   rows x payload_bytes, slot i = row i of the version
    <bank>/_slabs/memories/v<version>.crc       crc32 of each row's payload (uint32 little-endian)
    <bank>/_slabs/memories/v<version>.json      the header (below), written last: no header, no slab

The index from ref_id to slot is the table's own row order at that version (slot i holds the
payload of row i, the row `take([i])` reads): the reader builds its ref_id -> row dict from the
table's ref_id column anyway, and a separate copy of it would have to be checked against that
column all the same. The header names what the slab mirrors: table, Lance version, row count,
codec (and quantizer), model hash, memory shape, payload bytes, and a digest over the
(ref_id, content_hash) of every row in order; `check` compares all of them with the table and
the file's size with rows x payload_bytes, and raises SlabError naming the first difference.

Integrity on read (format 2): the `.crc` file holds the crc32 of every row's payload, computed
from Lance's payload bytes as the slab is written; the header keeps a blake2b of it
(`row_crcs_digest`), checked when a reader loads it at open (4 bytes a row). `SlabReader.read`
checks the crc32 of each row the first time it returns it and raises SlabCorrupt naming the row
instead of returning other bytes (the MemoryStore then serves Lance, storage/memory_store.py):
only the rows read are checked, lazily, never the whole file at open (zlib.crc32: ~3.6 GB/s
here, BENCHMARKS.md "Integrity on read"). A format-1 slab (no crc file) is refused by `check` like any stale slab, so
readers use Lance until the next `m3 encode`, `m3 rebuild` or `m3 bank compact` writes it again
(each ensures the slab of the version it serves). `payload_digest` (blake2b of the payload file)
and every row's crc32 are checked by `verify_payloads` (it reads the whole file: `m3 bank
verify`). Versions are immutable, so a slab named by a version stays right for as long as the
version exists; the digest catches a table deleted and re-created, whose versions count from 1
again. Retention (storage/retention.py) deletes the slabs of versions it drops.

Only a bank on a filesystem gets slabs (a memory map needs a local file): on an object store
`write_slab` returns None and readers use Lance's `take`, as before.
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
import time
import zlib
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa

from model.errors import M3Error
from storage.layout import LayoutError
from storage.staging import open_atomic, write_bytes_atomic, write_text_atomic

if TYPE_CHECKING:
    from storage.bank import Bank

FORMAT = 2  # 2: per-row crc32 (the .crc file); a format-1 slab is written again, never read
TABLE = "memories"
_KEY_ROWS = 16384  # rows per batch of a scan of the key columns alone (ref_id, content_hash)
_PROBES = 8  # rows of a batch probed for the page cache before reading it (SlabReader)
_GAP = 16384  # bytes between two rows below which one WILLNEED covers both
_CAN_ANNOUNCE = hasattr(os, "posix_fadvise") and hasattr(os, "RWF_NOWAIT")  # Linux


class SlabError(M3Error, ValueError):
    """A slab that does not match its table, or a table whose payloads cannot be slabbed."""


class SlabCorrupt(SlabError):
    """Payload bytes that differ from the crc32 written with them; `rows`: the slots found bad."""

    def __init__(self, message: str, rows=()):
        super().__init__(message)
        self.rows = [int(r) for r in rows]


def slab_dir(bank: Bank) -> Path | None:
    """Where this bank keeps its slabs; None for a bank on an object store (no slabs there)."""
    try:
        return bank.layout.slabs(TABLE)
    except LayoutError:
        return None


def paths(bank: Bank, version: int) -> tuple[Path, Path] | None:
    d = slab_dir(bank)
    return None if d is None else (d / f"v{int(version)}.payload", d / f"v{int(version)}.json")


def crc_path(bank: Bank, version: int) -> Path | None:
    d = slab_dir(bank)
    return None if d is None else d / f"v{int(version)}.crc"


def row_crcs(block: np.ndarray) -> np.ndarray:
    """crc32 of each row of a (n, payload_bytes) uint8 array, as uint32."""
    crc = zlib.crc32
    return np.fromiter((crc(r) for r in block), np.uint32, len(block))


def row_digest(ref_ids, content_hashes, h=None):
    """blake2b over (ref_id, content_hash) of rows in order; feed batches into one `h`."""
    h = h or hashlib.blake2b(digest_size=16)
    for r, c in zip(ref_ids, content_hashes):
        h.update(f"{r}\x1f{c}\x1e".encode())
    return h


def _fixed_rows(payload: pa.Array, nbytes: int, ref_ids) -> np.ndarray:
    """A binary column of fixed-size payloads -> (n, nbytes) uint8, a view of its Arrow buffer
    (no per-row Python object). A row of another size is a SlabError naming it."""
    arr = payload.combine_chunks() if isinstance(payload, pa.ChunkedArray) else payload
    if len(arr) == 0:
        return np.zeros((0, nbytes), np.uint8)
    if arr.null_count:
        raise SlabError(
            f"corrupt memory payload for reference {ref_ids[int(np.flatnonzero(arr.is_null().to_numpy(zero_copy_only=False))[0])]!r}: null"
        )
    off_type = np.int64 if pa.types.is_large_binary(arr.type) else np.int32
    off = np.frombuffer(arr.buffers()[1], off_type, count=len(arr) + 1, offset=off_type().itemsize * arr.offset)
    bad = np.flatnonzero(np.diff(off) != nbytes)
    if len(bad):
        i = int(bad[0])
        raise SlabError(
            f"corrupt memory payload for reference {ref_ids[i]!r}: {int(off[i + 1] - off[i])} bytes, "
            f"expected {nbytes} (the codec's size for the table's memory shape)"
        )
    data = np.frombuffer(arr.buffers()[2], np.uint8)
    return data[off[0] : off[-1]].reshape(len(arr), nbytes)


def write_slab(bank: Bank, ds, codec, shape, meta: dict) -> dict | None:
    """Write the slab of the memories dataset `ds` (open at the version to mirror); return its
    header, or None for a bank on an object store. Rewrites nothing already there and valid."""
    where = paths(bank, ds.version)
    if where is None:
        return None
    payload_path, header_path = where
    try:
        return check(bank, ds, meta, codec.nbytes(shape), _rows_digest(ds))
    except SlabError:
        pass  # absent or stale: write it
    nbytes = codec.nbytes(shape)
    digest, pdigest, rows = hashlib.blake2b(digest_size=16), hashlib.blake2b(digest_size=16), 0
    crcs = []
    with open_atomic(payload_path, durable=True) as f:
        # the Bank's dataset: batches bounded by row width (storage/bank.py batch_rows)
        for batch in ds.to_batches(columns=["ref_id", "content_hash", "payload"]):
            ids = batch.column("ref_id").to_pylist()
            row_digest(ids, batch.column("content_hash").to_pylist(), digest)
            block = _fixed_rows(batch.column("payload"), nbytes, ids)
            f.write(memoryview(block).cast("B"))
            pdigest.update(memoryview(block).cast("B"))
            crcs.append(row_crcs(block))
            rows += len(ids)
    crc_bytes = (np.concatenate(crcs) if crcs else np.zeros(0, np.uint32)).astype("<u4").tobytes()
    write_bytes_atomic(crc_path(bank, ds.version), crc_bytes, durable=True)
    header = {
        "format": FORMAT,
        "table": TABLE,
        "version": int(ds.version),
        "rows": rows,
        "codec": meta.get("codec"),
        "quantizer_hash": meta.get("quantizer_hash"),
        "model_hash": meta.get("model_hash"),
        "shape": [int(s) for s in shape],
        "payload_bytes": nbytes,
        "digest": digest.hexdigest(),
        "payload_digest": pdigest.hexdigest(),
        "row_check": "crc32",
        "row_crcs_digest": hashlib.blake2b(crc_bytes, digest_size=16).hexdigest(),
        "written_at": time.time(),
    }
    # the commit point: a slab without its header does not exist
    write_text_atomic(header_path, json.dumps(header, indent=1, sort_keys=True), durable=True)
    return header


def ensure_slab(bank: Bank, version: int) -> dict | None:
    """The slab of memories version `version`, written if missing or stale; its header, or None
    where there is none to write (a bank on an object store, a table without rows). A table
    whose payloads are not all of the codec's size raises SlabError naming the first bad row."""
    from model.codecs import make_codec
    from storage.bank import _decode

    if slab_dir(bank) is None:
        return None
    ds = bank.dataset(TABLE, version=version, check=False)
    if ds.count_rows() == 0:
        return None
    meta = _decode(ds.schema.metadata)
    kw = {}
    if meta.get("codec") == "vq":
        kw = {"quantizer": meta.get("quantizer_path"), "quantizer_hash": meta.get("quantizer_hash")}
    codec = make_codec(meta["codec"], **kw)
    shape = ds.take([0], columns=["shape"]).column("shape")[0].as_py()
    return write_slab(bank, ds, codec, shape, meta)


def _rows_digest(ds) -> str:
    h = hashlib.blake2b(digest_size=16)
    for batch in ds.to_batches(columns=["ref_id", "content_hash"], batch_size=_KEY_ROWS):
        row_digest(batch.column("ref_id").to_pylist(), batch.column("content_hash").to_pylist(), h)
    return h.hexdigest()


def read_header(bank: Bank, version: int) -> dict | None:
    where = paths(bank, version)
    if where is None or not where[1].exists():
        return None
    return json.loads(where[1].read_text())


def check(bank: Bank, ds, meta: dict, payload_bytes: int, digest: str | None, rows: int | None = None) -> dict:
    """The slab header of `ds`'s version if the slab mirrors it exactly, else SlabError saying
    what differs. `digest` is row_digest of the table's rows (the caller has read those columns);
    None skips it (`m3 bank verify --quick`: the header and the file sizes alone). `rows`: the
    table's row count, when the caller has it (else count_rows)."""
    where = paths(bank, ds.version)
    if where is None:
        raise SlabError(f"the bank at {bank.uri} is on an object store: it has no slabs")
    header = read_header(bank, ds.version)
    if header is None:
        raise SlabError(f"no slab for memories version {ds.version} in {bank.uri}")
    name = f"slab {where[1]}"
    if header.get("format") != FORMAT:
        raise SlabError(
            f"{name} is format {header.get('format')}, not {FORMAT} (no per-row checksums): the next "
            f"`m3 encode`, `m3 rebuild` or `m3 bank compact` writes it again; until then memories are "
            f"read through Lance"
        )
    want = {
        "table": TABLE,
        "version": int(ds.version),
        "rows": ds.count_rows() if rows is None else rows,
        "codec": meta.get("codec"),
        "quantizer_hash": meta.get("quantizer_hash"),
        "model_hash": meta.get("model_hash"),
        "payload_bytes": payload_bytes,
        **({"digest": digest} if digest is not None else {}),
    }
    for key, value in want.items():
        if header.get(key) != value:
            what = "digest over (ref_id, content_hash)" if key == "digest" else key
            raise SlabError(
                f"{name} does not match memories version {ds.version}: its {what} is "
                f"{header.get(key)!r}, the table's is {value!r}"
            )
    for path, per, what in ((where[0], payload_bytes, "payload"), (crc_path(bank, ds.version), 4, "checksum")):
        size = path.stat().st_size if path.exists() else None
        if size != header["rows"] * per:
            raise SlabError(
                f"{name}: {what} file {path} is {size if size is not None else 'missing'}"
                f"{' bytes' if size is not None else ''}, expected {header['rows']} rows x "
                f"{per} B = {header['rows'] * per} bytes (truncated or replaced)"
            )
    return header


def read_crcs(bank: Bank, version: int, header: dict) -> np.ndarray:
    """The per-row crc32s of a checked slab, themselves checked against the header's digest."""
    path = crc_path(bank, version)
    data = path.read_bytes()
    if hashlib.blake2b(data, digest_size=16).hexdigest() != header.get("row_crcs_digest"):
        raise SlabCorrupt(
            f"slab of memories version {version}: its checksum file {path} differs from what was "
            f"written (digest in the header {header.get('row_crcs_digest')})"
        )
    return np.frombuffer(data, "<u4").astype(np.uint32)


def verify_payloads(bank: Bank, version: int) -> dict:
    """Read the whole payload file and check every row against its crc32 (format 2: they cover
    every byte of a file of the right size), or the file against the header's payload_digest
    (format 1); the header, or SlabCorrupt naming the bad rows (`.rows`)."""
    header = read_header(bank, version)
    if header is None:
        raise SlabError(f"no slab for memories version {version} in {bank.uri}")
    path, per = paths(bank, version)[0], int(header["payload_bytes"])
    crcs = read_crcs(bank, version, header) if header.get("format") == FORMAT else None
    h, bad, at = hashlib.blake2b(digest_size=16), [], 0
    step = max(1, (8 << 20) // max(per, 1))  # whole rows per read, ~8 MiB
    with open(path, "rb") as f:
        while chunk := f.read(step * per):
            if crcs is None:
                h.update(chunk)
            elif per:
                block = np.frombuffer(chunk, np.uint8)[: len(chunk) // per * per].reshape(-1, per)
                got = row_crcs(block)
                bad.extend((np.flatnonzero(got != crcs[at : at + len(got)]) + at).tolist())
                at += len(got)
    if crcs is not None and at != len(crcs):
        raise SlabCorrupt(
            f"slab of memories version {version}: payload file {path} holds {at} whole rows, "
            f"its checksum file {len(crcs)} (truncated or replaced)"
        )
    if bad:
        raise SlabCorrupt(
            f"slab of memories version {version}: {len(bad)} row(s) differ from their checksums "
            f"(first: row {bad[0]}) in {path}",
            bad,
        )
    if crcs is None and h.hexdigest() != header["payload_digest"]:
        raise SlabCorrupt(
            f"slab of memories version {version}: payload bytes differ from what was written "
            f"(digest {h.hexdigest()}, header {header['payload_digest']})"
        )
    return header


class SlabReader:
    """Rows of a checked slab, read from a read-only memory map of the payload file.

    `read(rows)` copies the rows asked for, in the order asked, into a new array: the only copy
    between the page cache and the decoded memory (a raw codec decodes by reinterpreting it).
    MADV_RANDOM: a batch of random rows reads only its own pages on a page-cache miss, no
    readahead around each. But the copy takes its page faults one after another, one disk read
    each, so a batch that is not in the page cache is first announced whole: one
    POSIX_FADV_WILLNEED per run of nearby rows starts all its reads at once, and the copy then
    waits for reads already under way (cold 160 rows: 23 -> 4-9 ms, BENCHMARKS.md). Whether it
    is cached is probed, not guessed: a 1-byte preadv with RWF_NOWAIT at up to `_PROBES` of its
    rows (about 1 us each), so a warm batch pays a few syscalls, not one per row; a batch of at
    most `_PROBES` rows is announced without probing. `read_pread` is the same with one
    os.preadv per run of adjacent rows (for comparison in bench/fetch.py; mapped=False reads
    only that way). Pages a live map has touched stay resident while it lives (the kernel does
    not drop mapped pages).

    With `crcs` (the slab's per-row crc32s), a row is checked against its crc32 the first time
    this reader returns it: a row that differs raises SlabCorrupt naming it, never its bytes
    (module docstring). Checked once per reader, lazily, as pages are checked once when they are
    read in: a serving store pays one crc32 pass over the rows it reads, not one per read (the
    check costs about what the copy does, BENCHMARKS.md "Integrity on read"). What it does not
    see: a file changed in place after this reader checked the row (its map shows the new bytes);
    a new reader, and `m3 bank verify`, check it again."""

    def __init__(self, path: Path, rows: int, payload_bytes: int, mapped: bool = True, crcs: np.ndarray | None = None):
        self.path, self.rows, self.payload_bytes, self.crcs = path, rows, payload_bytes, crcs
        self._ok = np.zeros(rows, bool)  # rows whose crc32 this reader has checked
        self._fd = os.open(path, os.O_RDONLY)
        if mapped and rows and payload_bytes:
            self._map = mmap.mmap(self._fd, rows * payload_bytes, prot=mmap.PROT_READ)
            self._map.madvise(mmap.MADV_RANDOM)
            self._rows = np.frombuffer(self._map, np.uint8).reshape(rows, payload_bytes)
        else:
            self._map, self._rows = None, np.zeros((rows, payload_bytes), np.uint8)

    def read(self, rows: np.ndarray) -> np.ndarray:
        if self._map is None and self.rows:
            return self.read_pread(rows)
        if len(rows) and _CAN_ANNOUNCE:
            self._announce(rows)
        return self._checked(rows, self._rows.take(rows, axis=0))  # a fresh, writable (n, payload_bytes) array

    def _checked(self, rows: np.ndarray, out: np.ndarray) -> np.ndarray:
        """`out` (the rows just copied) once each of its rows not checked yet by this reader
        matches its crc32; else SlabCorrupt naming the rows that do not."""
        if self.crcs is None or not len(rows):
            return out
        rows = np.asarray(rows)
        todo = np.flatnonzero(~self._ok[rows])
        if not len(todo):  # every row already checked by this reader: a store's usual batch
            return out
        crc = zlib.crc32
        got = (
            row_crcs(out)
            if len(todo) == len(rows)
            else np.fromiter((crc(out[i]) for i in todo.tolist()), np.uint32, len(todo))
        )
        bad = todo[got != self.crcs[rows[todo]]]
        if len(bad):
            slots = np.unique(rows[bad])
            raise SlabCorrupt(
                f"payload slab {self.path}: row {int(slots[0])}"
                f"{f' (and {len(slots) - 1} more of this read)' if len(slots) > 1 else ''} "
                f"differs from its checksum",
                slots,
            )
        self._ok[rows[todo]] = True
        return out

    def _announce(self, rows: np.ndarray) -> None:
        """WILLNEED for every run of the batch's rows (gaps under _GAP bytes read through),
        unless probing says the batch is in the page cache (class docstring)."""
        # probed before anything is computed: a warm batch (the usual one) costs the probes alone
        if len(rows) > _PROBES and self._cached(rows[:: -(-len(rows) // _PROBES)]):
            return
        P, srt = self.payload_bytes, np.sort(rows)
        cut = np.flatnonzero((srt[1:] - srt[:-1] - 1) * P >= _GAP) + 1
        starts, ends = srt[np.r_[0, cut]], srt[np.r_[cut - 1, len(srt) - 1]] + 1
        for a, b in zip((starts * P).tolist(), ((ends - starts) * P).tolist()):
            os.posix_fadvise(self._fd, a, b, os.POSIX_FADV_WILLNEED)

    def _cached(self, rows: np.ndarray) -> bool:
        probe = bytearray(1)
        for r in rows.tolist():
            try:
                os.preadv(self._fd, [probe], r * self.payload_bytes, os.RWF_NOWAIT)
            except OSError:  # EAGAIN: not in the page cache (or a filesystem that cannot say)
                return False
        return True

    def read_pread(self, rows: np.ndarray) -> np.ndarray:
        out = np.empty((len(rows), self.payload_bytes), np.uint8)
        order = np.argsort(rows, kind="stable")
        srt = rows[order]
        tmp = np.empty_like(out)
        lo, P = 0, self.payload_bytes
        while lo < len(srt):  # coalesce runs of adjacent slots into one read
            hi = lo + 1
            while hi < len(srt) and srt[hi] == srt[hi - 1] + 1:
                hi += 1
            os.preadv(self._fd, [memoryview(tmp[lo:hi]).cast("B")], int(srt[lo]) * P)
            lo = hi
        out[order] = tmp
        return self._checked(rows, out)

    def close(self) -> None:
        self._rows = None
        if self._map is not None:
            self._map.close()
            self._map = None
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __del__(self):
        try:
            self.close()
        except Exception:  # noqa: BLE001 (interpreter shutdown)
            pass


def open_slab(bank: Bank, ds, meta: dict, payload_bytes: int, digest: str) -> SlabReader:
    """A reader of the slab of `ds`'s version, checked against the table (SlabError otherwise),
    that checks every row it reads against the slab's crc32s."""
    header = check(bank, ds, meta, payload_bytes, digest)
    crcs = read_crcs(bank, ds.version, header)
    return SlabReader(paths(bank, ds.version)[0], header["rows"], payload_bytes, crcs=crcs)


def footprint(bank: Bank) -> dict | None:
    """Bytes of the bank's slab files, which live beside the tables (and so outside every
    table's own listing): {"dir", "files", "bytes", "versions"}; None for a bank on an object
    store. Every file in the slab directory counts, leftovers of an interrupted write too."""
    d = slab_dir(bank)
    if d is None:
        return None
    files = [p for p in d.iterdir() if p.is_file()] if d.exists() else []
    versions = sorted({int(p.stem[1:]) for p in files if p.suffix == ".json" and p.stem[1:].isdigit()})
    return {"dir": str(d), "files": len(files), "bytes": sum(p.stat().st_size for p in files), "versions": versions}


def prune(bank: Bank, versions_on_disk) -> list[int]:
    """Delete the slabs of memories versions that no longer exist; return their versions."""
    d = slab_dir(bank)
    if d is None or not d.exists():
        return []
    keep, gone = {int(v) for v in versions_on_disk}, []
    for p in sorted(d.iterdir()):
        stem = p.name.split(".")[0]
        if p.name.startswith(".") or not stem.startswith("v") or not stem[1:].isdigit():
            continue
        v = int(stem[1:])
        if v not in keep:
            p.unlink(missing_ok=True)
            gone.append(v)
    return sorted(set(gone))
