"""Reading a bank's tables for comparison: rows in a canonical order."""

from __future__ import annotations

from pathlib import Path

KEYS = {
    "documents": "doc_id",
    "rejects": "doc_id",
    "refs": "ref_id",
    "train_sequences": "seq_id",
    "embeddings": "ref_id",
    "memories": "ref_id",
}


def rows(bank: Path, table: str, drop: tuple[str, ...] = ()) -> dict:
    """{column: values} of the table's latest version, sorted by its key; blob columns left out."""
    import lance

    ds = lance.dataset(str(bank / f"{table}.lance"))
    cols = [f.name for f in ds.schema if f.name not in drop and not (f.metadata or {}).get(b"lance-encoding:blob")]
    t = ds.to_table(columns=cols).sort_by(KEYS[table])
    return t.to_pydict()
