"""The runs table: a row per attempt, started then finished, compacted as it grows, visible to SQL."""

from __future__ import annotations

from datetime import datetime

import lance

import storage.runs as runs
from storage.bank import Bank
from storage.runs import RunLog
from storage.sql import query


def test_runs_are_recorded_updated_and_compacted(tmp_path, monkeypatch):
    monkeypatch.setattr(runs, "COMPACT_FRAGMENTS", 4)
    log = RunLog(Bank(str(tmp_path)))
    slot = datetime(2026, 11, 26, 3, 0)
    for i in range(7):
        log.start(f"r{i}", slot, i % 2, "process")
        if i < 6:
            log.finish(
                f"r{i}",
                "published" if i % 2 else "failed",
                {"added": i, "changed": 1, "removed": 0, "versions": {"refs": i}, "tag": "live"},
                error=None if i % 2 else "boom",
            )
    rows = log.rows()
    assert [r["run_id"] for r in rows] == [f"r{i}" for i in range(7)]
    assert [r["status"] for r in rows] == ["failed", "published"] * 3 + ["running"]  # r6 still running
    assert rows[5]["added"] == 5 and rows[5]["versions"] == '{"refs": 5}' and rows[0]["error"] == "boom"
    assert all(r["ended_at"] >= r["started_at"] for r in rows[:6]) and rows[6]["ended_at"] is None
    assert len(lance.dataset(str(tmp_path / "runs.lance")).get_fragments()) < 7  # merged on the way
    n = query(Bank(str(tmp_path), live=True), "SELECT count(*) FROM runs WHERE status = 'published'")[1][0][0]
    assert n == 3
