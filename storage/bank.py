"""The bank: one directory of LanceDB tables, each write one commit with its lineage attached.

Readers that must never see a half-built bank open it with `Bank(uri, live=True)`: every table
then resolves to the version the bank's `live` manifest names (storage/live.py) where there is
one, and to the latest version otherwise. The stages themselves read and write the latest.

Lineage (the config, the corpus version, the tokenizer hash, ...) rides in the Arrow schema
metadata under the key `m3`, so it travels with every version of the table and `m3 sql` users,
readers in other stages and a later rebuild can all ask "what produced this?".

A damaged table is one line, not a traceback from inside Lance: `Bank.table` and `Bank.dataset`
check, once per table version, that every data and deletion file the version's manifest names
is there with the size it was written at (one stat per file, local banks), and `readable` turns
an error Lance raises while reading into a BankError naming the table and, when the check finds
one, the file, with `run m3 bank verify` (jobs/ops/verify.py) to see everything that is wrong.
"""

from __future__ import annotations

import functools
import json
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable

import pyarrow as pa
import pyarrow.compute as pc

from model.errors import M3Error
from storage.freed_memory import return_freed_memory
from storage.layout import BankLayout, LayoutError, check_bank_uri, is_uri
from storage.schemas import SCHEMA_VERSION

META_KEY = b"m3"
LATEST = "latest"  # Bank.dataset's version: the newest, whatever the bank is pinned to


# Lance scans 8,192 rows per batch and buffers up to 2 GiB of reads by default: with a memory per
# row (131 KB at bench/scale.py's shape, 39 KB at the paper's) one batch is a gigabyte, and a scan
# holds several (measured: `m3 bank stats` and the slab write of `m3 encode` peaked at 2.6-2.9 GB
# on an 877 MB memories table). Every dataset the bank opens scans in batches of about
# SCAN_BATCH_BYTES of its files with at most SCAN_IO_BUFFER read ahead; DuckDB's scans go through
# the same dataset (storage/sql.py).
# (a scan holds a few batches decoded: on a 325 MB table of 512 KiB memories, a scan grew the
# process by 121 MiB with 16 MB batches, 52 MiB with 4 MB)
SCAN_BATCH_BYTES = 4 << 20
SCAN_IO_BUFFER = 64 << 20
# wide rows read ahead less: a compressed page of memories is megabytes, and what is read ahead
# is held decoded too (a 325 MB table of 512 KiB memories, peak RSS of a scan: 383 MiB with the
# 64 MiB buffer and Lance's readahead, 298 MiB with these; ids alone ~180 MiB)
WIDE_SCAN = {"io_buffer_size": 8 << 20, "batch_readahead": 1}
LANCE_BATCH_ROWS = 8192


def batch_rows(ds) -> int:
    """Rows per scanned batch of `ds` that keep a batch near SCAN_BATCH_BYTES of its files (from
    the sizes the manifest records: nothing is read), at most Lance's default."""
    rows = nbytes = 0
    for frag in ds.get_fragments():
        rows += frag.metadata.physical_rows or 0
        nbytes += sum(f.file_size_bytes or 0 for f in frag.metadata.files)
    return int(max(16, min(LANCE_BATCH_ROWS, SCAN_BATCH_BYTES * max(rows, 1) // max(nbytes, 1))))


class BankError(M3Error, RuntimeError):
    pass


class Bank:
    """A bank and where its parts live: the one object stages, training, inference and operations
    take and pass (the URI string lives only at the CLI and the config loader).

    `run_dir` is train.run_dir: where training keeps its stages when not inside the bank (a bank
    on an object store has no directory for DeepSpeed and torch to write to)."""

    def __init__(self, uri: str, live: bool = False, run_dir: str | None = None):
        from storage.live import live_versions

        self.uri = str(uri)
        check_bank_uri(self.uri)  # a file or an unknown scheme: one line here, not "File exists" from LanceDB
        self.layout = BankLayout(self.uri)
        self.live, self.run_dir = live, run_dir
        # read once: a reader keeps one consistent build for its whole life, even if a
        # rebuild publishes a new one meanwhile
        self.pins: dict[str, int] = live_versions(self) if live else {}
        self._intact: set[tuple[str, int]] = set()  # table versions whose files were checked

    @functools.cached_property
    def db(self):
        # on first use: a Bank is cheap to make and to ship to a worker (connecting to an object
        # store already asks it for the bucket's region)
        import lancedb  # here, not at the top: its import is ~1.3 s of every command's start

        return lancedb.connect(self.uri)

    @classmethod
    def of(cls, cfg, live: bool = False) -> "Bank":
        """The bank a config names, with its training directory (train.run_dir) where it has one."""
        return cls(cfg.bank.uri, live=live, run_dir=getattr(getattr(cfg, "train", None), "run_dir", None))

    def __reduce__(self):
        # Ray ships a Bank to actors and tasks: the worker reconnects, and keeps the pins so a
        # live or pinned reader there sees the very build the driver resolved
        return _reopen, (self.uri, self.live, self.run_dir, dict(self.pins))

    def at(self, pins: dict[str, int] | None = None) -> "Bank":
        """This bank read at `pins` (table -> version: storage/builds.py resolves a build, a tag),
        or, without, at its live build as published now."""
        if pins is None:
            return Bank(self.uri, live=True, run_dir=self.run_dir)
        return _reopen(self.uri, False, self.run_dir, dict(pins))

    def __repr__(self) -> str:
        return f"Bank({self.uri!r}{', live=True' if self.live else ''})"

    def training(self, stage: str) -> Path:
        """Where a training stage keeps its checkpoints, log and exported model: a local (or
        shared) directory, since DeepSpeed and torch write them with file APIs. A bank on an
        object store has none: its training lives under train.run_dir, and asking without one
        says so."""
        run_dir = self.run_dir
        if run_dir and is_uri(run_dir) and not run_dir.startswith("file://"):
            raise LayoutError(
                f"train.run_dir={run_dir}: training checkpoints are written by DeepSpeed and torch "
                f"with local file APIs; give a local or shared directory"
            )
        if run_dir:
            return Path(run_dir.removeprefix("file://")).resolve() / stage
        try:
            return self.layout.training().resolve() / stage
        except LayoutError:
            raise LayoutError(
                f"train.run_dir: the bank at {self.uri} is on an object store, and training "
                f"writes its checkpoints, log and exported model with local file APIs (DeepSpeed, "
                f"torch); set train.run_dir to a local or shared directory for them"
            ) from None

    def trained_model(self, stage: str) -> Path:
        """The model a training stage exports (config.json and WEIGHTS_FILE)."""
        return self.training(stage) / "model"

    def tables(self) -> list[str]:
        if self.layout.on_object_store():
            return sorted(self.db.list_tables().tables)
        # a local bank lists its directory as LanceDB does (every <name>.lance directory), so a
        # command that only reads through Lance (m3 sql) never imports LanceDB
        root = self.layout.local()
        return sorted(p.name[: -len(".lance")] for p in root.glob("*.lance") if p.is_dir()) if root.is_dir() else []

    def has(self, name: str) -> bool:
        return name in self.tables()

    # which command makes each table, for the message when a stage finds one missing
    MADE_BY = {
        "documents": "m3 ingest",
        "rejects": "m3 ingest",
        "refs": "m3 ingest",
        "train_sequences": "m3 ingest",
        "memories": "m3 encode",
        "embeddings": "m3 embed",
        "neighbors": "m3 pair",
    }

    def require(self, *names: str) -> None:
        """Fail, naming the command to run, if a table a stage reads is not there yet."""
        for name in names:
            if not self.has(name):
                raise BankError(f"bank {self.uri} has no {name} table: run `{self.MADE_BY[name]}` first")

    def table(self, name: str):
        if not self.has(name):
            raise BankError(f"bank {self.uri} has no table {name!r} (tables: {', '.join(self.tables()) or 'none'})")
        tbl = self.db.open_table(name)
        if name in self.pins:
            tbl.checkout(self.pins[name])
        self._check_files(name, tbl.version, tbl.to_lance)
        meta = _decode(tbl.schema.metadata)
        version = meta.get("schema_version")
        if version is not None and version != SCHEMA_VERSION:
            raise BankError(
                f"table {name!r} in {self.uri} was written with schema version {version}; this code reads "
                f"version {SCHEMA_VERSION}: rebuild the bank or use a matching release"
            )
        return tbl

    def metadata(self, name: str) -> dict:
        """The lineage of the latest version of a table ({} if it has none)."""
        return _decode(self.table(name).schema.metadata)

    def dataset(self, name: str, version: int | str | None = None, check: bool = True):
        """The table as a Lance dataset: what DuckDB and Arrow scanners read with pushdown. At
        `version` (LATEST: the newest), else the pinned one, else the newest. `check=False`
        skips the file check: for what looks for damage itself (`m3 bank verify`) and what
        reads versions by number (builds, retention, a store's memories)."""
        if version == LATEST:
            version = None
        elif version is None:
            version = self.pins.get(name)
        ds = self._open(name, version)
        if check:
            self._check_files(name, ds.version, lambda: ds)
        return ds

    def _open(self, name: str, version: int | None):
        """The Lance dataset at `version`, None the latest, whatever the pins say, its scans
        bounded in memory (`batch_rows`)."""
        import lance

        uri = self.layout.table(name)
        ds = lance.dataset(uri, version=version, default_scan_options={"io_buffer_size": SCAN_IO_BUFFER})
        rows = batch_rows(ds)
        if rows == LANCE_BATCH_ROWS:  # narrow rows: Lance's batch is small enough
            return ds
        return_freed_memory()  # what a scan of wide rows frees leaves the process (storage/freed_memory.py)
        return lance.dataset(uri, version=ds.version, default_scan_options={**WIDE_SCAN, "batch_size": rows})

    def _check_files(self, name: str, version: int, dataset) -> None:
        """BankError naming the first file of this table version that is missing or not the size
        written (module docstring); once per version, local banks only."""
        if (name, version) in self._intact or self.layout.on_object_store():
            return
        bad = damaged_files(self, name, dataset())
        if bad:
            raise BankError(
                f"table {name} (version {version}) of bank {self.uri} cannot be read: {bad[0]}"
                f"{f' (and {len(bad) - 1} more file(s))' if len(bad) > 1 else ''}; run `m3 bank verify`"
            )
        self._intact.add((name, version))

    def write(self, name: str, schema: pa.Schema, batches: Iterable[pa.RecordBatch], lineage: dict) -> int:
        """Replace the table's contents with `batches` as one new version; return that version.

        Streaming: the batches are consumed one at a time, never materialized together.
        """
        import lance

        from storage.table_delta import as_schema

        schema = with_lineage(name, schema, lineage)
        return_freed_memory()  # the writer's buffers too (storage/freed_memory.py)
        reader = pa.RecordBatchReader.from_batches(schema, as_schema(schema, batches))
        mode = "overwrite" if self.has(name) else "create"
        # Lance's writer, not LanceDB's create_table (the same dataset): through LanceDB a 456 MB
        # table of 512 KiB memories peaked 230 MiB above the process's start, through Lance 108
        return lance.write_dataset(reader, self.layout.table(name), schema=schema, mode=mode).version

    def update(
        self, name: str, schema: pa.Schema, read_version: int, deleted, batches: Iterable[pa.RecordBatch], lineage: dict
    ) -> int:
        """A new version of the table made from `read_version`: the rows at row addresses
        `deleted` gone, `batches` appended, unchanged files shared (storage/table_delta.py)."""
        from storage.table_delta import commit_update

        schema = with_lineage(name, schema, lineage)
        return commit_update(self.layout.table(name), read_version, deleted, schema, batches, _commit_key(lineage))

    def replace_rows(self, name: str, schema: pa.Schema, batches, identity: list[str], lineage: dict) -> int:
        """`write`, as an update of the latest version that keeps the rows already there (the
        same `identity` columns) in their files (storage/table_delta.py `diff_update`);
        `batches` is called twice."""
        from storage.table_delta import diff_update

        schema = with_lineage(name, schema, lineage)
        version = self.dataset(name, LATEST, check=False).version
        return diff_update(self.layout.table(name), version, schema, batches, identity, _commit_key(lineage))

    def finish_update(self, name: str, schema: pa.Schema, lineage: dict) -> int | None:
        """The version of an update of `lineage`'s commit killed before its metadata was
        written, with the metadata written now; None if there is none."""
        from storage.table_delta import finish

        schema = with_lineage(name, schema, lineage)
        return finish(self.layout.table(name), _commit_key(lineage), schema)

    def tag(self, name: str, tag: str, version: int) -> None:
        """Name a version; an existing tag of that name moves to it."""
        tags = self.db.open_table(name).tags
        if tag in tags.list():
            tags.update(tag, version)
        else:
            tags.create(tag, version)

    def tags(self, name: str) -> dict[str, int]:
        return {t: info["version"] for t, info in sorted(self._open(name, None).tags.list().items())}


def with_lineage(name: str, schema: pa.Schema, lineage: dict) -> pa.Schema:
    """`schema` carrying the table's lineage under META_KEY (the module docstring)."""
    meta = {"schema_version": SCHEMA_VERSION, "table": name, "written_at": time.time(), **lineage}
    return schema.with_metadata({META_KEY: json.dumps(meta, sort_keys=True, default=str).encode()})


def _commit_key(lineage: dict) -> str:
    """What names one commit of a stage: the key fields of its lineage (the stage's *_key and the
    keys of what it was built from)."""
    return json.dumps({k: v for k, v in sorted(lineage.items()) if k.endswith("_key")}, default=str)


def _reopen(uri: str, live: bool, run_dir: str | None, pins: dict[str, int]) -> Bank:
    bank = Bank(uri, run_dir=run_dir)
    bank.live, bank.pins = live, pins
    return bank


def damaged_files(bank: Bank, name: str, ds) -> list[str]:
    """One line per file of `ds` (a version of table `name`) that is missing or whose size is not
    the one its manifest recorded. A local bank stats each file; one on an object store lists the
    table's directory once (`m3 bank verify`; Bank's own check skips object stores)."""
    layout = bank.layout
    if layout.on_object_store():
        listing = ds.all_files().read_all()
        sizes = dict(zip(listing.column("path").to_pylist(), listing.column("size_bytes").to_pylist()))
        size_of = sizes.get
    else:
        root = Path(layout.local()) / f"{name}.lance"

        def size_of(rel: str) -> int | None:
            try:
                return (root / rel).stat().st_size
            except FileNotFoundError:
                return None

    out = []
    for frag in ds.get_fragments():
        md = frag.metadata
        files = [(f"data/{f.path}", f.file_size_bytes) for f in md.files]
        if md.deletion_file is not None:
            files.append((md.deletion_file.path(md.id), None))
        for rel, want in files:
            have = size_of(rel)
            if have is None:
                out.append(f"its file {name}.lance/{rel} is missing")
            elif want and have != want:
                out.append(
                    f"its file {name}.lance/{rel} is {have:,} bytes, the table's manifest says {want:,} "
                    f"(truncated or replaced)"
                )
    return out


# what Lance (and pyarrow under it) raise on a file they cannot read: IO errors, corrupt pages
_LANCE_ERRORS = (OSError, pa.ArrowException, RuntimeError)


@contextmanager
def readable(bank: Bank, *names: str):
    """Reads of a bank's tables (`names`, or every table): an error Lance raises becomes one
    BankError naming the table and file (module docstring); any other error goes on as it is."""
    try:
        yield
    except M3Error:
        raise
    except _LANCE_ERRORS as e:
        err = unreadable(bank, names, e)
        if err is None:
            raise
        raise err from e


_LOCATE_BYTES = 1 << 30  # data of the tables named above which an error is not located to a file


def unreadable(bank: Bank, names, error: BaseException) -> BankError | None:
    """The BankError for `error` raised while reading tables `names` of the bank (all of them
    when empty), naming the damaged file when it can be found: one missing or of another size
    (at the live or latest version of those tables), else, for named tables of at most 1 GB, the
    data file that does not decode (this reads them: the error path only). None when the error
    is not Lance's (a bug keeps its traceback)."""
    from storage.live import live_versions

    live, layout = live_versions(bank), bank.layout
    try:
        tables = list(names) or bank.tables()
    except Exception:  # noqa: BLE001 (the bank itself cannot be listed: quote the error)
        tables = list(names)
    opened = []
    for name in tables:
        for version in dict.fromkeys([live.get(name), None]):
            try:
                ds = bank._open(name, version)
                bad = damaged_files(bank, name, ds)
            except Exception:  # noqa: BLE001 (a manifest that cannot be read: the next table)
                continue
            if bad:
                return BankError(f"table {name} of bank {bank.uri} cannot be read: {bad[0]}; run `m3 bank verify`")
            opened.append((name, ds))
    text = str(error)
    if "lance" not in text.lower() and "corrupt" not in text.lower():
        return None
    first = text.strip().splitlines()[0] if text.strip() else type(error).__name__
    first = first.split(", /")[0][:300]  # Lance appends the Rust source location
    if (
        names
        and sum(f.file_size_bytes or 0 for _, ds in opened for fr in ds.get_fragments() for f in fr.metadata.files)
        <= _LOCATE_BYTES
    ):
        for name, ds in opened:
            if (path := _undecodable(layout.table(name), ds)) is not None:
                return BankError(
                    f"table {name} of bank {bank.uri} cannot be read: its file {name}.lance/{path} "
                    f"does not decode ({first}); run `m3 bank verify`"
                )
    what = f"table {'/'.join(names)}" if names else "a table"
    return BankError(f"{what} of bank {bank.uri} cannot be read ({first}): a file is damaged; run `m3 bank verify`")


def _undecodable(table_uri: str, ds) -> str | None:
    """The first data file of `ds` that does not read to its end, relative to the table."""
    from lance.file import LanceFileReader

    for frag in ds.get_fragments():
        for f in frag.metadata.files:
            try:
                for _ in LanceFileReader(f"{table_uri}/data/{f.path}").read_all(batch_size=8192).to_batches():
                    pass
            except Exception:  # noqa: BLE001 (this file is the damaged one)
                return f"data/{f.path}"
    return None


def _decode(metadata: dict | None) -> dict:
    if not metadata or META_KEY not in metadata:
        return {}
    return json.loads(metadata[META_KEY])


_ID_BATCH = 2048  # ref_ids per refs filter: keeps the IN list of one scan bounded


def tokens_of(refs_ds, ref_ids, with_docs: bool = False):
    """token_ids of the given references of a `refs` dataset, by ref_id, in a few filtered scans;
    with_docs also each reference's doc_id (a second dict). Shared by pairing, training's reader
    and the retriever."""
    ids = sorted(set(ref_ids))
    out: dict[str, list[int]] = {}
    docs: dict[str, str] = {}
    columns = ["ref_id", "token_ids"] + (["doc_id"] if with_docs else [])
    for lo in range(0, len(ids), _ID_BATCH):
        t = refs_ds.to_table(columns=columns, filter=pc.field("ref_id").isin(ids[lo : lo + _ID_BATCH]))
        rid = t.column("ref_id").to_pylist()
        out.update(zip(rid, t.column("token_ids").to_pylist()))
        if with_docs:
            docs.update(zip(rid, t.column("doc_id").to_pylist()))
    return (out, docs) if with_docs else out
