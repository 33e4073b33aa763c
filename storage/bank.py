"""The bank: one directory of LanceDB tables, each write one commit with its lineage attached.

Readers that must never see a half-built bank open it with `Bank(uri, live=True)`: every table
then resolves to the version the bank's `live` manifest names (storage/live.py) where there is
one, and to the latest version otherwise. The stages themselves read and write the latest.

Lineage (the config, the corpus version, the tokenizer hash, ...) rides in the Arrow schema
metadata under the key `m3`, so it travels with every version of the table and `m3 sql` users,
readers in other stages and a later rebuild can all ask "what produced this?".
"""

from __future__ import annotations

import json
import time
from typing import Iterable

import lancedb
import pyarrow as pa
import pyarrow.compute as pc

from model.errors import M3Error
from storage.schemas import SCHEMA_VERSION
from storage.layout import BankLayout, check_bank_uri

META_KEY = b"m3"


class BankError(M3Error, RuntimeError):
    pass


class Bank:
    def __init__(self, uri: str, live: bool = False):
        from storage.live import live_versions

        self.uri = uri
        check_bank_uri(uri)  # a file or an unknown scheme: one line here, not "File exists" from LanceDB
        self.db = lancedb.connect(uri)
        # read once: a reader keeps one consistent build for its whole life, even if a
        # rebuild publishes a new one meanwhile
        self.pins: dict[str, int] = live_versions(uri) if live else {}

    def tables(self) -> list[str]:
        return sorted(self.db.list_tables().tables)

    def has(self, name: str) -> bool:
        return name in self.tables()

    # which command makes each table, for the message when a stage finds one missing
    MADE_BY = {"documents": "m3 ingest", "rejects": "m3 ingest", "refs": "m3 ingest", "train_sequences": "m3 ingest",
               "memories": "m3 encode", "embeddings": "m3 embed", "neighbors": "m3 pair"}

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
        meta = _decode(tbl.schema.metadata)
        version = meta.get("schema_version")
        if version is not None and version != SCHEMA_VERSION:
            raise BankError(
                f"table {name!r} in {self.uri} was written with schema version {version}; this code reads "
                f"version {SCHEMA_VERSION}: rebuild the bank or use a matching release")
        return tbl

    def metadata(self, name: str) -> dict:
        """The lineage of the latest version of a table ({} if it has none)."""
        return _decode(self.table(name).schema.metadata)

    def dataset(self, name: str):
        """The table as a Lance dataset: what DuckDB and Arrow scanners read with pushdown."""
        import lance

        return lance.dataset(BankLayout(self.uri).table(name), version=self.pins.get(name))

    def write(self, name: str, schema: pa.Schema, batches: Iterable[pa.RecordBatch], lineage: dict) -> int:
        """Replace the table's contents with `batches` as one new version; return that version.

        Streaming: the batches are consumed one at a time, never materialized together.
        """
        meta = {"schema_version": SCHEMA_VERSION, "table": name, "written_at": time.time(), **lineage}
        schema = schema.with_metadata({META_KEY: json.dumps(meta, sort_keys=True, default=str).encode()})

        def cast():
            for batch in batches:
                # staged parquet may differ in string widths or metadata; the table's schema wins
                yield batch if batch.schema == schema else batch.cast(schema)

        reader = pa.RecordBatchReader.from_batches(schema, cast())
        mode = "overwrite" if self.has(name) else "create"
        tbl = self.db.create_table(name, data=reader, schema=schema, mode=mode)
        return tbl.version


    def tag(self, name: str, tag: str, version: int) -> None:
        """Name a version; an existing tag of that name moves to it."""
        tags = self.db.open_table(name).tags
        if tag in tags.list():
            tags.update(tag, version)
        else:
            tags.create(tag, version)

    def tags(self, name: str) -> dict[str, int]:
        return {t: info["version"] for t, info in self.db.open_table(name).tags.list().items()}


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
        t = refs_ds.to_table(columns=columns, filter=pc.field("ref_id").isin(ids[lo:lo + _ID_BATCH]))
        rid = t.column("ref_id").to_pylist()
        out.update(zip(rid, t.column("token_ids").to_pylist()))
        if with_docs:
            docs.update(zip(rid, t.column("doc_id").to_pylist()))
    return (out, docs) if with_docs else out
