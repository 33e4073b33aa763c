"""SQL over the bank with DuckDB, in process and read only.

DuckDB's own `lance` extension cannot be installed here (no download), so each table is handed
to DuckDB as a Lance dataset object: DuckDB scans it through Arrow with projection and filter
pushdown, so `SELECT doc_id FROM documents WHERE ...` reads one column, not the whole table.
Registered objects cannot be written through SQL, which makes the views read only.

Read only means nothing else either: no file, network or extension access. Only statements that
read run (SELECT and its forms: WITH, FROM, VALUES, SHOW, DESCRIBE, SUMMARIZE, PIVOT; EXPLAIN;
PRAGMA and CALL), anything else (COPY, ATTACH, CREATE, INSERT, EXPORT, INSTALL, LOAD, SET, ...)
is refused before it runs, and the connection itself has DuckDB's external access off (no COPY
TO, ATTACH, read_csv/read_text of a path, glob, INSTALL or LOAD, secrets), no extension
autoinstall or autoload, and its configuration locked last, after the views are registered (a
registered Lance dataset or Arrow table still scans with external access off), so no SET or
PRAGMA can turn any of it back on. Every refusal is one SQLError that says the SQL is read-only.

Results stream: `stream` hands the rows over in batches of BATCH_ROWS as DuckDB produces them
and `render_stream` writes each batch as it comes, so `m3 sql` holds one batch, whatever the
size of the result (`query` collects them all, for the small results code asks for). The table
format needs column widths before its first row: they are the widest of the header and the first
batch (cells are cut at 80 characters), and grow from there when a later row has a wider cell,
so a result of up to BATCH_ROWS rows is aligned throughout and a longer one stays aligned until
such a row. Control characters in a cell or a column name are shown escaped in the table
(`\\x1b`, `\\t`, `\\r`; a newline as ⏎), never sent to the terminal.

Which version of each table a view reads is the Bank's business (`bank.pins`): the live build by
default, or a build, tag or version (storage/builds.py, `m3 sql --build/--tag/--version`). A
`builds` view lists the published builds (storage/builds.builds_table); it lists every table's
files, so it is built only when the query names it.
"""

from __future__ import annotations

import csv
import io
import json
import re
from collections.abc import Iterable, Iterator

import duckdb

from model.errors import M3Error
from storage.bank import Bank

# Wide binary/list columns that would flood a terminal: shown as their size instead.
_SUMMARIZE = {"token_ids", "payload", "vector"}
BATCH_ROWS = 1000  # rows fetched, rendered and written at a time
# the statements that only read (PIVOT is a MULTI statement); everything else is refused
_READS = {"SELECT", "EXPLAIN", "PRAGMA", "CALL", "MULTI"}
_READ_ONLY = (
    "the SQL is read-only (SELECT, WITH, SHOW, DESCRIBE, SUMMARIZE, EXPLAIN, PRAGMA, CALL): "
    "no writes, settings, extensions, files or network"
)
# C0 and C1 controls (ESC starts ANSI sequences), the Unicode line separators and bidi overrides
_CONTROL = re.compile("[\x00-\x09\x0b-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")
_NAMED = {"\t": "\\t", "\r": "\\r"}


class SQLError(M3Error, ValueError):
    pass


def _read_only_settings(con: duckdb.DuckDBPyConnection) -> None:
    con.execute("SET lock_configuration = true")  # last: from here on no SET or PRAGMA changes anything


def connect(bank: Bank, builds: bool = True) -> duckdb.DuckDBPyConnection:
    """An in-memory DuckDB with the bank's tables as views, read only (the module's docstring)."""
    con = duckdb.connect(
        ":memory:",
        config={
            "enable_external_access": False,
            "autoinstall_known_extensions": False,
            "autoload_known_extensions": False,
        },
    )
    try:
        for name in bank.tables():
            con.register(name, bank.dataset(name))
        if builds and "builds" not in bank.tables():
            from storage.builds import builds_table

            con.register("builds", builds_table(bank))
        _read_only_settings(con)
    except BaseException:
        con.close()
        raise
    return con


def _error(e: duckdb.Error, bank: Bank) -> SQLError:
    text = str(e).strip()
    first = text.splitlines()[0] if text else type(e).__name__
    if isinstance(e, duckdb.PermissionException) or "configuration has been locked" in text:
        return SQLError(f"{_READ_ONLY} ({first})")
    return SQLError(f"SQL error: {text} (tables: {', '.join(bank.tables()) or 'none'})")


def _check(sql: str) -> None:
    """Refuse an empty query and any statement that does not only read, before anything runs."""
    if not sql.strip():
        raise SQLError('empty query: give one SELECT (e.g. "SELECT count(*) FROM refs")')
    with duckdb.connect(":memory:", config={"enable_external_access": False}) as parser:
        try:
            statements = parser.extract_statements(sql)
        except duckdb.Error as e:
            raise SQLError(f"SQL error: {str(e).strip()}") from None
    if not statements:
        raise SQLError("empty query (only comments or semicolons): give one SELECT")
    for s in statements:
        kind = s.type.name
        if kind not in _READS:
            raise SQLError(f"{_READ_ONLY}: a {kind} statement cannot run ({' '.join(s.query.split())[:80]})")


def stream(bank: Bank, sql: str, batch_rows: int = BATCH_ROWS) -> tuple[list[str], Iterator[list[tuple]]]:
    """(column names, the rows in batches of up to batch_rows as DuckDB produces them). The
    connection closes when the batches are exhausted (or the iterator is closed)."""
    _check(sql)
    con = connect(bank, builds="builds" in sql.lower())
    try:
        cur = con.execute(sql)
    except duckdb.Error as e:
        con.close()
        raise _error(e, bank) from None
    columns = [d[0] for d in cur.description] if cur.description else []

    def batches() -> Iterator[list[tuple]]:
        try:
            if not columns:
                return
            while True:
                try:
                    rows = cur.fetchmany(batch_rows)
                except duckdb.Error as e:
                    raise _error(e, bank) from None
                if not rows:
                    return
                yield rows
        finally:
            con.close()

    return columns, batches()


def query(bank: Bank, sql: str) -> tuple[list[str], list[tuple]]:
    """Every row at once: for results known to be small (`stream` for any size)."""
    columns, batches = stream(bank, sql)
    return columns, [row for batch in batches for row in batch]


def _escape(text: str) -> str:
    text = text.replace("\n", "⏎")
    return _CONTROL.sub(
        lambda m: _NAMED.get(
            m.group(), f"\\x{ord(m.group()):02x}" if ord(m.group()) < 0x100 else f"\\u{ord(m.group()):04x}"
        ),
        text,
    )


def _cell(column: str, value) -> str:
    if value is None:
        return "NULL"
    if column in _SUMMARIZE and isinstance(value, (list, bytes)):
        return f"<{len(value)} {'items' if isinstance(value, list) else 'bytes'}>"
    text = _escape(str(value))
    return text if len(text) <= 80 else text[:77] + "..."


def render_stream(columns: list[str], batches: Iterable[list[tuple]], fmt: str = "table") -> Iterator[str]:
    """The result as text, one piece per batch (each ends with a newline), written as the batches
    come; the table ends with its "(N rows)" footer."""
    if fmt == "json":
        for rows in batches:
            if rows:
                yield "".join(json.dumps(dict(zip(columns, r)), ensure_ascii=False, default=str) + "\n" for r in rows)
        return
    if fmt == "csv":
        out = io.StringIO()
        writer = csv.writer(out)
        writer.writerow(columns)
        for rows in batches:
            writer.writerows(rows)
            yield out.getvalue()
            out.seek(0)
            out.truncate()
        if out.getvalue():
            yield out.getvalue()
        return
    header = [_escape(c) for c in columns]
    widths = [len(h) for h in header]
    n, started = 0, False
    line = lambda vals: " | ".join(v.ljust(w) for v, w in zip(vals, widths))  # noqa: E731
    for rows in batches:
        cells = [[_cell(c, v) for c, v in zip(columns, r)] for r in rows]
        widths = [max([w] + [len(row[i]) for row in cells]) for i, w in enumerate(widths)]
        lines = [] if started else [line(header), "-+-".join("-" * w for w in widths)]
        started = True
        lines += [line(r) for r in cells]
        n += len(rows)
        if lines:
            yield "\n".join(lines) + "\n"
    if not started:
        yield line(header) + "\n" + "-+-".join("-" * w for w in widths) + "\n"
    yield f"({n} row{'s' if n != 1 else ''})\n"


def render(columns: list[str], rows: list[tuple], fmt: str = "table") -> str:
    return "".join(render_stream(columns, [rows], fmt)).rstrip("\n")
