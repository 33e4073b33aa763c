"""Read a raw corpus (JSONL, Parquet, plain-text folders; gzip or zstd) as records.

Reading never raises on bad data: a record that cannot be a document (malformed JSON, invalid
UTF-8, no text, binary junk, too large) comes back with a `reason` so the pipeline can keep it
as a reject, and so does a file that holds no record at all (`empty_file`, one reject for the
file). Only problems with the *configuration* (a missing path, a Parquet file without the
text column) raise, and they do so while planning, before any Ray work starts.

A compressed file that is truncated or corrupt raises too (`InputError`, naming the file):
read quietly, it would be a corpus with records missing or garbled. gzip checks its CRC and
length at the end of each member; zstd's decoder checks each frame's content checksum (when the
frame has one, as the zstd CLI writes) but ends quietly where the input ends, so a zstd file's
frame structure is walked to its last byte once the stream is read to the end. Counting a file
(`count_records`, while planning) reads it to the end, so the error comes before any Ray work.

Work is cut into shards: a range of records of one file (or a run of small text files). A shard
is the unit of parallelism and of resumption, so it must be cheap to re-read on its own.
"""

from __future__ import annotations

import glob
import gzip
import hashlib
import io
import json
import os
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Iterator

import pyarrow.parquet as pq

from model.errors import M3Error

# A rank orders every record of the corpus: (file index << 40) | record index in the file.
# It is the tie-breaker that makes dedup deterministic whatever the number of workers.
RANK_BITS = 40
TEXT_SUFFIXES = (".txt", ".md", ".rst", ".text")
# What a source file is for (corpus.roles): knowledge only, training text only, or both.
ROLES = ("bank", "training", "both")
RAW_PREFIX_CHARS = 200


class InputError(M3Error, ValueError):
    """The configured input cannot be read at all (as opposed to one bad record)."""


@dataclass(frozen=True)
class SourceFile:
    path: str
    format: str  # jsonl | parquet | text
    index: int
    # Its path below what corpus.paths named (the folder, or a glob's fixed folders): a text
    # file's id, so that moving the corpus keeps its doc_id (its full path would not)
    name: str = ""
    # bank | training | both: the role of the corpus.paths entry that named it (ROLES)
    role: str = "both"


@dataclass(frozen=True)
class Shard:
    shard_id: str
    # (file index, first record, end record) ranges; several only for runs of small text files.
    ranges: tuple[tuple[int, int, int], ...]


@dataclass
class Record:
    rank: int
    source: str
    source_id: str
    text: str | None = None
    meta: str | None = None  # JSON of the record's other fields
    reason: str | None = None  # why it cannot be a document; None for a good record
    raw_prefix: str = ""

    @property
    def doc_id(self) -> str:
        return doc_id(self.source, self.source_id)


def doc_id(source: str, source_id: str) -> str:
    # The file's name, not its directory: moving the corpus must not change document ids.
    key = f"{Path(source).name}\x1f{source_id}".encode()
    return hashlib.blake2b(key, digest_size=8).hexdigest()


def _strip_compression(name: str) -> str:
    for ext in (".gz", ".zst", ".zstd"):
        if name.endswith(ext):
            return name[: -len(ext)]
    return name


def detect_format(path: str, configured: str) -> str | None:
    if configured != "auto":
        return configured
    name = _strip_compression(path.lower())
    if name.endswith((".jsonl", ".json", ".ndjson")):
        return "jsonl"
    if name.endswith(".parquet"):
        return "parquet"
    if name.endswith(TEXT_SUFFIXES):
        return "text"
    return None


def expand_paths(
    patterns: tuple[str, ...] | list[str], fmt: str = "auto", roles: dict[str, str] | None = None
) -> list[SourceFile]:
    """Resolve files, directories and globs into an ordered list of input files, each with the
    role `roles` gives the pattern that named it ("both" when it names none). A file named by
    two patterns of different roles is refused: which one it has would be an accident of order."""
    roles = roles or {}
    found: list[tuple[str, str, str]] = []  # (path, the folder its name is relative to, pattern)
    for pattern in patterns:
        start = len(found)
        if any(ch in pattern for ch in "*?["):
            matches = sorted(glob.glob(pattern, recursive=True))
            if not matches:
                raise InputError(f"corpus.paths: the pattern {pattern!r} matches no file")
            parts = Path(pattern).parts
            fixed = next(i for i, part in enumerate(parts) if any(ch in part for ch in "*?["))
            base = str(Path(*parts[:fixed])) if fixed else "."
            found.extend((m, base) for m in matches if os.path.isfile(m))
        elif os.path.isdir(pattern):
            found.extend((p, pattern) for p in sorted(str(p) for p in Path(pattern).rglob("*") if p.is_file()))
        elif os.path.isfile(pattern):
            found.append((pattern, os.path.dirname(pattern) or "."))
        else:
            raise InputError(f"corpus.paths: {pattern!r} does not exist (working directory {os.getcwd()})")
        found[start:] = [(path, base, pattern) for path, base in found[start:]]
    files, seen = [], {}
    for path, base, pattern in found:
        role = roles.get(pattern, "both")
        if path in seen:
            first = seen[path]
            if roles.get(first, "both") != role:
                raise InputError(
                    f"corpus.roles: {path} is named by {first!r} (role {roles.get(first, 'both')}) and "
                    f"by {pattern!r} (role {role}); give each file one role"
                )
            continue
        seen[path] = pattern
        kind = detect_format(path, fmt)
        if kind is None:
            continue  # a folder may hold READMEs, licenses, indexes: only known formats are corpus
        files.append(
            SourceFile(
                path=path, format=kind, index=len(files), name=Path(os.path.relpath(path, base)).as_posix(), role=role
            )
        )
    if not files:
        raise InputError(f"corpus.paths: no readable corpus files in {list(patterns)}")
    return files


def open_binary(path: str) -> BinaryIO:
    if path.endswith(".gz"):
        return io.BufferedReader(_Decompressed(path, "gzip"), buffer_size=1 << 16)
    if path.endswith((".zst", ".zstd")):
        return io.BufferedReader(_Decompressed(path, "zstd"), buffer_size=1 << 16)
    return open(path, "rb")


class _Decompressed(io.RawIOBase):
    """A gzip or zstd file's decompressed bytes, failing with an InputError that names the file
    when it is truncated or corrupt (the decoders' own errors name nothing, and zstd's readers
    do not notice a frame that stops short)."""

    def __init__(self, path: str, kind: str):
        self.path, self.kind = path, kind
        self._file = open(path, "rb")
        if kind == "gzip":
            self._stream = gzip.GzipFile(fileobj=self._file, mode="rb")
        else:
            import zstandard

            self._stream = zstandard.ZstdDecompressor().stream_reader(
                self._file, read_across_frames=True, closefd=False
            )
        self._ended = False

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        try:
            n = self._stream.readinto(buffer)
        except (EOFError, zlib.error, gzip.BadGzipFile) as e:
            raise self._corrupt(str(e)) from None
        except Exception as e:  # noqa: BLE001 - zstandard.ZstdError, imported lazily
            if type(e).__name__ != "ZstdError":
                raise
            raise self._corrupt(str(e)) from None
        if n == 0 and len(buffer) and not self._ended:
            self._ended = True
            problem = _empty_problem(self.path, self.kind) or (
                _zstd_structure_problem(self.path) if self.kind == "zstd" else None
            )
            if problem:
                raise self._corrupt(problem)
        return n

    def _corrupt(self, why: str) -> InputError:
        return InputError(
            f"{self.path}: this {self.kind} file is truncated or corrupt ({why}); copy or download it again"
        )

    def close(self) -> None:
        if not self.closed:
            try:
                self._stream.close()
            finally:
                self._file.close()
        super().close()


def _empty_problem(path: str, kind: str) -> str | None:
    # gzip and zstd write a header even for empty input (20 and 9+ bytes)
    return f"0 bytes: even an empty {kind} stream has a header" if os.path.getsize(path) == 0 else None


_ZSTD_MAGIC = 0xFD2FB528


def _zstd_structure_problem(path: str) -> str | None:
    """Why the file is not a whole sequence of zstd frames (RFC 8878, 3.1), or None: each
    frame's header, every block header up to the last block, the blocks' sizes and the content
    checksum must all lie inside the file. Reads the headers only (a few bytes per 128 KiB
    block of text); the content itself is the decoder's to check."""
    size = os.path.getsize(path)
    pos = 0
    with open(path, "rb") as f:
        while pos < size:
            f.seek(pos)
            head = f.read(5)
            if len(head) < 4:
                return f"{size - pos} stray byte(s) after the last frame, at byte {pos}"
            magic = int.from_bytes(head[:4], "little")
            if magic & 0xFFFFFFF0 == 0x184D2A50:  # a skippable frame: magic, 4-byte length, data
                length = f.read(3)
                if len(head) + len(length) < 8:
                    return f"the skippable frame at byte {pos} is cut short"
                pos += 8 + int.from_bytes((head[4:] + length), "little")
                continue
            if magic != _ZSTD_MAGIC or len(head) < 5:
                return f"no zstd frame at byte {pos}"
            fhd = head[4]
            single_segment, checksum = fhd >> 5 & 1, fhd >> 2 & 1
            pos += (
                5
                + (0 if single_segment else 1)
                + (0, 1, 2, 4)[fhd & 3]
                + ((1 if single_segment else 0), 2, 4, 8)[fhd >> 6]
            )
            while True:
                f.seek(pos)
                block = f.read(3)
                if len(block) < 3:
                    return f"the frame stops before its last block (file ends at byte {size})"
                header = int.from_bytes(block, "little")
                pos += 3 + (1 if header >> 1 & 3 == 1 else header >> 3)  # an RLE block holds 1 byte
                if header & 1:
                    break
            pos += 4 * checksum
            if pos > size:
                return f"the last frame needs {pos} bytes, the file has {size}"
    return None


def _lines(f: BinaryIO, limit: int) -> Iterator[bytes | None]:
    """Yield the lines of a stream without their newline; None for a line longer than `limit`
    (which is skipped without ever being held in memory whole)."""
    while True:
        line = f.readline(limit + 1)
        if not line:
            return
        if len(line) > limit and not line.endswith(b"\n"):
            while True:  # drain the rest of the oversized line
                rest = f.readline(1 << 20)
                if not rest or rest.endswith(b"\n"):
                    break
            yield None
            continue
        yield line[:-1] if line.endswith(b"\n") else line


def count_records(src: SourceFile, limit: int) -> tuple[int, str]:
    """Records in one file and the hash of its bytes (the file's part of the corpus version)."""
    h = hashlib.blake2b(digest_size=16)
    with open(src.path, "rb") as raw:
        for block in iter(lambda: raw.read(1 << 20), b""):
            h.update(block)
    if src.format == "text":
        return 1, h.hexdigest()
    if src.format == "parquet":
        try:
            n = pq.ParquetFile(src.path).metadata.num_rows
        except Exception as e:  # noqa: BLE001 - any failure to parse the footer
            raise InputError(f"{src.path}: not a readable Parquet file: {e}") from None
    else:
        with open_binary(src.path) as f:
            n = sum(1 for _ in _lines(f, limit))
    # a file without records is one: its reject (`empty_file`) says that the file was read
    return max(n, 1), h.hexdigest()


def _empty_file(src: SourceFile) -> Record:
    return Record(src.index << RANK_BITS, src.path, "0", reason="empty_file")


def plan_shards(files: list[SourceFile], counts: list[int], records_per_shard: int) -> list[Shard]:
    shards: list[Shard] = []
    pending: list[tuple[int, int, int]] = []  # small text files batched together
    for src, n in zip(files, counts):
        if src.format == "text":
            pending.append((src.index, 0, 1))
            if len(pending) >= records_per_shard:
                shards.append(Shard(f"s{len(shards):06d}", tuple(pending)))
                pending = []
            continue
        for start in range(0, n, records_per_shard):
            shards.append(Shard(f"s{len(shards):06d}", ((src.index, start, min(n, start + records_per_shard)),)))
    if pending:
        shards.append(Shard(f"s{len(shards):06d}", tuple(pending)))
    return shards


def check_parquet_columns(files: list[SourceFile], text_key: str) -> None:
    for src in files:
        if src.format == "parquet":
            names = pq.ParquetFile(src.path).schema_arrow.names
            if text_key not in names:
                raise InputError(f"{src.path}: no column {text_key!r} (corpus.text_key); columns are {names}")


def _prefix(raw: bytes | str) -> str:
    if isinstance(raw, bytes):
        raw = raw[: RAW_PREFIX_CHARS * 4].decode("utf-8", errors="replace")
    return raw[:RAW_PREFIX_CHARS]


def _from_object(
    obj: object, rank: int, source: str, line_no: int, text_key: str, id_key: str | None, raw: bytes | str
) -> Record:
    rec = Record(rank=rank, source=source, source_id=str(line_no), raw_prefix=_prefix(raw))
    if not isinstance(obj, dict):
        rec.reason = "not_an_object"
        return rec
    if id_key and obj.get(id_key) is not None:
        rec.source_id = str(obj[id_key])
    text = obj.get(text_key)
    if text is None:
        rec.reason = "missing_text"
    elif not isinstance(text, str):
        rec.reason = "text_not_string"
    else:
        rec.text = text
        extra = {k: v for k, v in obj.items() if k not in (text_key, id_key)}
        rec.meta = json.dumps(extra, ensure_ascii=False, default=str) if extra else None
    return rec


def _read_jsonl(
    src: SourceFile, start: int, end: int, text_key: str, id_key: str | None, limit: int
) -> Iterator[Record]:
    base = src.index << RANK_BITS
    with open_binary(src.path) as f:
        i = -1
        for i, line in enumerate(_lines(f, limit)):
            if i < start:
                continue
            if i >= end:
                return
            rank = base + i
            if line is None:
                yield Record(rank, src.path, str(i), reason="record_too_large")
                continue
            if not line.strip():
                yield Record(rank, src.path, str(i), reason="blank_line")
                continue
            try:
                decoded = line.decode("utf-8")
            except UnicodeDecodeError:
                yield Record(rank, src.path, str(i), reason="invalid_utf8", raw_prefix=_prefix(line))
                continue
            try:
                obj = json.loads(decoded)
            except ValueError:
                yield Record(rank, src.path, str(i), reason="malformed_json", raw_prefix=_prefix(decoded))
                continue
            yield _from_object(obj, rank, src.path, i, text_key, id_key, decoded)
    if i < 0 and start == 0 < end:
        yield _empty_file(src)


def _read_parquet(src: SourceFile, start: int, end: int, text_key: str, id_key: str | None) -> Iterator[Record]:
    base = src.index << RANK_BITS
    pf = pq.ParquetFile(src.path)
    if pf.metadata.num_rows == 0:
        if start == 0 < end:
            yield _empty_file(src)
        return
    row = 0
    for batch in pf.iter_batches(batch_size=1024):
        if row + batch.num_rows <= start:
            row += batch.num_rows
            continue
        for obj in batch.to_pylist():
            if start <= row < end:
                yield _from_object(
                    obj, base + row, src.path, row, text_key, id_key, str(obj.get(text_key, ""))[:RAW_PREFIX_CHARS]
                )
            row += 1
            if row >= end:
                return


def _read_text_file(src: SourceFile, limit: int) -> Record:
    rank = src.index << RANK_BITS
    rec = Record(rank=rank, source=src.path, source_id=src.name or Path(src.path).name)
    if os.path.getsize(src.path) > limit:
        rec.reason = "record_too_large"
        return rec
    with open_binary(src.path) as f:
        data = f.read(limit + 1)
    if len(data) > limit:
        rec.reason = "record_too_large"
        return rec
    rec.raw_prefix = _prefix(data)
    if b"\x00" in data[:8192]:
        rec.reason = "binary_file"
        return rec
    try:
        rec.text = data.decode("utf-8")
    except UnicodeDecodeError:
        rec.reason = "invalid_utf8"
    return rec


def read_shard(
    shard: Shard,
    files: list[SourceFile],
    text_key: str = "text",
    id_key: str | None = "id",
    max_record_bytes: int = 64 * 2**20,
) -> Iterator[Record]:
    for file_index, start, end in shard.ranges:
        src = files[file_index]
        if src.format == "jsonl":
            yield from _read_jsonl(src, start, end, text_key, id_key, max_record_bytes)
        elif src.format == "parquet":
            yield from _read_parquet(src, start, end, text_key, id_key)
        else:
            yield _read_text_file(src, max_record_bytes)
