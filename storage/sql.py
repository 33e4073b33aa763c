"""SQL over the bank with DuckDB, in process and read only.

DuckDB's own `lance` extension cannot be installed here (no download), so each table is handed
to DuckDB as a Lance dataset object: DuckDB scans it through Arrow with projection and filter
pushdown, so `SELECT doc_id FROM documents WHERE ...` reads one column, not the whole table.
Registered objects cannot be written through SQL, which makes the views read only.

Which version of each table a view reads is the Bank's business (`bank.pins`): the live build by
default, or a build, tag or version (storage/builds.py, `m3 sql --build/--tag/--version`). A
`builds` view lists the published builds (storage/builds.builds_table); it lists every table's
files, so it is built only when the query names it.
"""

from __future__ import annotations

import csv
import io
import json

import duckdb

from model.errors import M3Error
from storage.bank import Bank

# Wide binary/list columns that would flood a terminal: shown as their size instead.
_SUMMARIZE = {"token_ids", "payload", "vector"}


class SQLError(M3Error, ValueError):
    pass


def connect(bank: Bank, builds: bool = True) -> duckdb.DuckDBPyConnection:
    con = duckdb.connect(":memory:")
    for name in bank.tables():
        con.register(name, bank.dataset(name))
    if builds and "builds" not in bank.tables():
        from storage.builds import builds_table

        con.register("builds", builds_table(bank.uri))
    return con


def query(bank: Bank, sql: str) -> tuple[list[str], list[tuple]]:
    con = connect(bank, builds="builds" in sql.lower())
    try:
        cur = con.execute(sql)
    except duckdb.Error as e:
        raise SQLError(f"SQL error: {e} (tables: {', '.join(bank.tables()) or 'none'})") from None
    columns = [d[0] for d in cur.description] if cur.description else []
    return columns, cur.fetchall()


def _cell(column: str, value) -> str:
    if value is None:
        return "NULL"
    if column in _SUMMARIZE and isinstance(value, (list, bytes)):
        return f"<{len(value)} {'items' if isinstance(value, list) else 'bytes'}>"
    text = str(value).replace("\n", "⏎")
    return text if len(text) <= 80 else text[:77] + "..."


def render(columns: list[str], rows: list[tuple], fmt: str = "table") -> str:
    if fmt == "json":
        return "\n".join(json.dumps(dict(zip(columns, r)), ensure_ascii=False, default=str) for r in rows)
    if fmt == "csv":
        out = io.StringIO()
        writer = csv.writer(out)
        writer.writerow(columns)
        writer.writerows(rows)
        return out.getvalue().rstrip("\n")
    cells = [[_cell(c, v) for c, v in zip(columns, r)] for r in rows]
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(columns)]
    line = lambda vals: " | ".join(v.ljust(w) for v, w in zip(vals, widths))  # noqa: E731
    out = [line(columns), "-+-".join("-" * w for w in widths), *[line(r) for r in cells]]
    out.append(f"({len(rows)} row{'s' if len(rows) != 1 else ''})")
    return "\n".join(out)
