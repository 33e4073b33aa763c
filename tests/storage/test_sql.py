"""`m3 sql` / storage.sql: read only (no writes, files, network, extensions or settings), empty
queries one line, results streamed in batches, control characters escaped in the table. On a tiny
hand-made bank of two published builds (tests/storage/banks.py; no Ray)."""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import duckdb
import pytest

from jobs.cli.main import main
from storage.bank import Bank
from storage.builds import pinned_bank
from storage.sql import BATCH_ROWS, SQLError, connect, query, render, render_stream, stream
from tests.conftest import ROOT
from tests.storage.banks import two_builds


@pytest.fixture
def bank(tmp_path) -> Bank:
    return two_builds(tmp_path / "bank")


def files(root: Path) -> dict[str, str]:
    """Every file under root -> the hash of its bytes."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def sql(bank: Bank, text: str, *args: str) -> int:
    return main(["sql", "--set", f"bank.uri={bank.uri}", text, *args])


def one_line_error(capsys, *words: str) -> str:
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert err.startswith("m3 sql: error: ") and all(w in err for w in words), err
    return err


def test_copy_to_a_bank_file_fails_and_the_bank_is_unchanged(bank, tmp_path, capsys):
    before = files(tmp_path / "bank")
    target = next((tmp_path / "bank" / "refs.lance" / "data").glob("*.lance"))
    copy = f"COPY (SELECT 'x') TO '{target}' (FORMAT csv)"
    with pytest.raises(SQLError, match="read-only"):
        query(bank, copy)
    assert sql(bank, copy) == 2
    one_line_error(capsys, "read-only", "COPY")
    with connect(bank) as con, pytest.raises(duckdb.PermissionException):  # the connection refuses it too
        con.execute(copy)
    with pytest.raises(SQLError, match="read-only"):
        query(bank, f"EXPORT DATABASE '{tmp_path / 'export'}'")
    assert files(tmp_path / "bank") == before and not (tmp_path / "export").exists()
    assert query(bank, "SELECT count(*) FROM refs")[1] == [(6,)]


def test_attach_and_create_fail(bank, tmp_path, capsys):
    db = tmp_path / "elsewhere.duckdb"
    for text in (
        f"ATTACH '{db}' AS x",
        f"ATTACH '{db}' AS x; CREATE TABLE x.t AS SELECT * FROM refs",
        "CREATE TABLE t AS SELECT * FROM refs",
        "CREATE VIEW v AS SELECT 1",
        "INSERT INTO refs SELECT * FROM refs",
        "DELETE FROM refs",
        "SELECT 1; DROP TABLE refs",
    ):
        with pytest.raises(SQLError, match="read-only"):
            query(bank, text)
    assert sql(bank, f"ATTACH '{db}' AS x") == 2
    one_line_error(capsys, "read-only", "ATTACH")
    with connect(bank) as con, pytest.raises(duckdb.PermissionException):
        con.execute(f"ATTACH '{db}' AS x")
    assert not db.exists()


def test_no_file_is_read_outside_the_bank(bank, capsys):
    for text in (
        "SELECT * FROM read_text('/etc/hostname')",
        "SELECT * FROM read_csv('/etc/passwd')",
        "SELECT * FROM glob('/etc/*')",
        f"SELECT * FROM read_blob('{ROOT / 'pyproject.toml'}')",
    ):
        with pytest.raises(SQLError, match="read-only.*Permission Error"):
            query(bank, text)
    assert sql(bank, "SELECT * FROM read_text('/etc/hostname')") == 2
    one_line_error(capsys, "read-only", "/etc/hostname")


def test_install_and_load_fail_at_once_without_the_network(bank):
    for text in ("INSTALL httpfs", "FORCE INSTALL httpfs FROM core", "LOAD httpfs", "INSTALL lance FROM community"):
        t0 = time.monotonic()
        with pytest.raises(SQLError, match="read-only"):
            query(bank, text)
        assert time.monotonic() - t0 < 10  # refused, not a download that times out
    with connect(bank) as con:  # the connection refuses them too
        for text in ("INSTALL httpfs", "LOAD httpfs"):
            with pytest.raises(duckdb.PermissionException):
                con.execute(text)


def test_no_setting_can_turn_access_back_on(bank, capsys):
    for text in (
        "SET enable_external_access = true",
        "SET GLOBAL lock_configuration = false",
        "RESET lock_configuration",
        "SET autoinstall_known_extensions = true",
        "PRAGMA enable_profiling",
        "USE memory",
    ):
        with pytest.raises(SQLError, match="read-only"):
            query(bank, text)
    assert sql(bank, "SET enable_external_access=true") == 2
    one_line_error(capsys, "read-only", "SET")
    with connect(bank) as con:  # past the statement check, the locked configuration says no
        for text in ("SET enable_external_access = true", "SET lock_configuration = false", "PRAGMA enable_profiling"):
            with pytest.raises(duckdb.InvalidInputException, match="locked"):
                con.execute(text)
        assert con.execute("SELECT current_setting('enable_external_access')").fetchone() == (False,)


def test_reading_statements_still_run(bank, tmp_path):
    assert query(bank, "SELECT ref_id FROM refs WHERE content_hash = 'B'")[1] == [("d2-0",)]  # the views scan
    joined = "WITH r AS (SELECT * FROM refs) SELECT count(*) FROM r JOIN memories USING (ref_id)"
    assert query(bank, joined)[1] == [(6,)]
    assert ("refs",) in query(bank, "SHOW TABLES")[1]
    assert "ref_id" in [r[0] for r in query(bank, "DESCRIBE refs")[1]]
    assert query(bank, "EXPLAIN SELECT count(*) FROM refs")[1]
    assert query(bank, "SELECT build FROM builds ORDER BY 1")[1] == [(1,), (2,)]  # the builds view
    assert query(pinned_bank(bank, 1), "SELECT count(*) FROM refs")[1] == [(5,)]
    assert query(bank, "SELECT 1 -- a comment\n;")[1] == [(1,)]


def test_pinned_cli_still_works(bank, capsys):
    for args, n in ((["--build", "1"], 5), (["--version", "refs=1"], 5), ([], 6)):
        assert sql(bank, "SELECT count(*) AS n FROM refs", "--format", "json", *args) == 0
        assert json.loads(capsys.readouterr().out) == {"n": n}


@pytest.mark.parametrize("text", ["", "   ", "\n\t", ";", " ; ; ", "-- nothing"])
def test_an_empty_query_is_one_line(bank, capsys, text):
    with pytest.raises(SQLError, match="empty query"):
        query(bank, text)
    assert sql(bank, text) == 2
    one_line_error(capsys, "empty query")


def test_a_syntax_error_is_an_error_not_a_traceback(bank, capsys):
    assert sql(bank, "SELEC 1") == 2
    err = capsys.readouterr().err  # DuckDB's message, with its pointer at the error
    assert err.startswith("m3 sql: error: SQL error: Parser Error: syntax error") and "Traceback" not in err


def test_results_stream_in_batches(bank):
    """A result without end: the first batches come at once, one batch in memory at a time (a
    fetchall would never return)."""
    columns, batches = stream(bank, "SELECT i, repeat('x', 100) AS s FROM range(10000000000) t(i)")
    assert columns == ["i", "s"]
    got = [next(batches) for _ in range(3)]
    assert [len(b) for b in got] == [BATCH_ROWS] * 3 and got[2][-1][0] == 3 * BATCH_ROWS - 1
    batches.close()
    # a finite one, rendered batch by batch: one piece per batch, the footer counts them all
    n = 5 * BATCH_ROWS + 7
    for fmt, lines in (("table", n + 3), ("csv", n + 1), ("json", n)):
        columns, batches = stream(bank, f"SELECT i, i * 2 AS j FROM range({n}) t(i)")
        pieces = list(render_stream(columns, batches, fmt))
        assert len(pieces) >= 6 and sum(p.count("\n") for p in pieces) == lines
    assert pieces[-1].endswith('{"i": %d, "j": %d}\n' % (n - 1, 2 * (n - 1)))
    columns, batches = stream(bank, f"SELECT i FROM range({n}) t(i)")
    assert list(render_stream(columns, batches))[-1] == f"({n} rows)\n"


def test_m3_sql_writes_as_it_reads(bank):
    """`m3 sql` over a result without end: its first lines arrive while it runs, and it ends
    quietly when the reader stops reading (`| head`)."""
    code = "import sys; from jobs.cli.main import main; sys.exit(main(sys.argv[1:]))"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-c",
            code,
            "sql",
            "--set",
            f"bank.uri={bank.uri}",
            "--format",
            "csv",
            "SELECT i, repeat('x', 200) AS s FROM range(10000000000) t(i)",
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        lines = [proc.stdout.readline() for _ in range(3 * BATCH_ROWS)]
        assert lines[0] == b"i,s\r\n" and lines[-1].startswith(b"%d," % (3 * BATCH_ROWS - 2))
        proc.stdout.close()
        assert proc.wait(timeout=120) == 0
        assert b"Traceback" not in proc.stderr.read()
    finally:
        proc.kill()
        proc.wait()


def test_table_escapes_control_characters(bank, capsys):
    nasty = "\x1b[31mred\x1b[0m\ttab\rcr\x00nul\x7fdel\x9bcsi\u202eltr\nnl\x07"
    text = render(["c\x1b[2J"], [(nasty,), ("plain",)])
    assert "\\x1b[31mred\\x1b[0m\\ttab\\rcr\\x00nul\\x7fdel\\x9bcsi\\u202eltr⏎nl\\x07" in text
    assert "c\\x1b[2J" in text.splitlines()[0]
    assert not re.search("[\x00-\x09\x0b-\x1f\x7f-\x9f\u202e]", text), text
    lines = text.splitlines()
    assert len(lines) == 5 and len({len(line) for line in lines[:4]}) == 1  # still aligned
    # through m3 sql: the bank's text with an escape sequence in it
    assert sql(bank, "SELECT chr(27) || '[2J' || text AS t FROM refs ORDER BY ref_id LIMIT 1") == 0
    out = capsys.readouterr().out
    assert "\\x1b[2Jtext of d1-0" in out and "\x1b" not in out and "(1 row)" in out


def test_wide_results_keep_the_header_aligned_with_the_first_batch():
    rows = [(f"r{i}", "x" * (i % 7)) for i in range(2 * BATCH_ROWS)] + [("last", "y" * 50)]
    text = "".join(render_stream(["name", "v"], [rows[:BATCH_ROWS], rows[BATCH_ROWS:]]))
    lines = text.splitlines()
    assert len({len(line) for line in lines[: BATCH_ROWS + 2]}) == 1  # header and first batch: one width
    assert lines[-2].endswith("y" * 50) and lines[-1] == f"({2 * BATCH_ROWS + 1} rows)"
