"""`m3 bank compact` under the rebuild lock, `m3 bank stats` bytes, and the CLI of `m3 sql --build`
and `m3 bank diff`, on a tiny hand-made bank (no Ray)."""

import json
from pathlib import Path

import pytest

from jobs.cli.main import main
from jobs.config import load_config
from jobs.ops.bank_stats import bank_stats, render
from jobs.ops.compact import run_compact
from jobs.ops.lock import BankLock, LockError
from storage.bank import Bank
from storage.live import read_manifest
from tests.storage.banks import B1_MEM, B1_REFS, publish_build, two_builds


def cfg(path: Path, *extra: str):
    return load_config(None, [f"bank.uri={path}", *extra])


def test_compact_refuses_while_a_rebuild_holds_the_lock(tmp_path):
    two_builds(tmp_path)
    with BankLock(Bank(str(tmp_path)), "rebuild"):
        with pytest.raises(
            LockError,
            match="cannot compact while another command writes the bank: another rebuild "
            r"of this bank is running .*: not starting compaction beside it",
        ):
            run_compact(cfg(tmp_path))
    assert run_compact(cfg(tmp_path))["build"] == 2  # free again: runs
    assert main(["bank", "compact", "--set", f"bank.uri={tmp_path}"]) == 0


def test_stats_live_and_dead_bytes_add_up_to_the_files_on_disk(tmp_path):
    bank = two_builds(tmp_path)
    for key in ("three", "four"):
        publish_build(bank, B1_REFS, B1_MEM, key)
    stats = bank_stats(Bank(str(tmp_path)), keep_builds=2)
    assert stats["kept_builds"] == [3, 4]
    for table in ("refs", "memories"):
        on_disk = sum(p.stat().st_size for p in (tmp_path / f"{table}.lance").rglob("*") if p.is_file())
        t = stats["tables"][table]
        assert t["live_bytes"] + t["dead_bytes"] == on_disk and t["live_bytes"] > 0 and t["dead_bytes"] > 0
    assert stats["live_bytes"] + stats["dead_bytes"] == sum(
        p.stat().st_size for p in tmp_path.glob("*.lance/**/*") if p.is_file()
    )
    text = render(stats)
    assert " dead " in text and "live = kept builds (3, 4)" in text
    dead = stats["dead_bytes"]
    run_compact(cfg(tmp_path, "rebuild.keep_builds=2"))
    assert bank_stats(Bank(str(tmp_path)), keep_builds=2)["dead_bytes"] < dead  # builds 1 and 2 went


def test_cli_sql_pinned_and_diff(tmp_path, capsys):
    two_builds(tmp_path)
    uri = f"bank.uri={tmp_path}"
    assert main(["sql", "--set", uri, "SELECT count(*) AS n FROM refs", "--build", "1", "--format", "json"]) == 0
    assert json.loads(capsys.readouterr().out) == {"n": 5}
    assert main(["sql", "--set", uri, "SELECT count(*) AS n FROM refs", "--build", "-1", "--format", "json"]) == 0
    assert json.loads(capsys.readouterr().out) == {"n": 5}
    assert main(["sql", "--set", uri, "SELECT count(*) AS n FROM refs", "--format", "json"]) == 0
    assert json.loads(capsys.readouterr().out) == {"n": 6}
    assert main(["sql", "--set", uri, "SELECT 1", "--build", "9"]) == 2
    assert "m3 sql: error: no published build 9" in capsys.readouterr().err
    assert main(["bank", "diff", "1", "live", "--set", uri, "--format", "json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["refs"]["added"] == 2 and d["memories"]["re_encoded"] == 4
    assert main(["bank", "diff", "1", "--set", uri]) == 2
    assert "usage: m3 bank diff A B" in capsys.readouterr().err


def test_compact_after_is_a_rebuild_key(tmp_path):
    assert cfg(tmp_path).rebuild.compact_after is False
    assert cfg(tmp_path, "rebuild.compact_after=true").rebuild.compact_after is True
    assert read_manifest(Bank(str(tmp_path))) is None
