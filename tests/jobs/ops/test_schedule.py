"""`m3 schedule`: rebuilds on a cron expression, recorded in the runs table, retried, stopped by SIGTERM."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from jobs.ops.lock import BankLock
from storage.bank import Bank
from storage.runs import RunLog
from storage.sql import query
from tests.conftest import ROOT, write_foldoc_corpus

pytestmark = pytest.mark.slow


def schedule_args(corpus: Path, bank: Path, *extra: str) -> list[str]:
    sets = [
        f"corpus.paths=[{corpus}]",
        f"bank.uri={bank}",
        "tokenizer.vocab_size=600",
        "chunking.seq_len=256",
        "model.preset=tiny",
        "model.vocab_size=600",
        "model.max_seq_len=512",
        "model.ref_max_tokens=128",
        "encode.refs_per_shard=64",
        "rebuild.embeddings=false",
        "ray.num_cpus=2",
        *extra,
    ]
    return [
        sys.executable,
        "-m",
        "jobs",
        "schedule",
        "-c",
        "configs/demo.yaml",
        *[a for s in sets for a in ("--set", s)],
    ]


def wait_for(cond, what: str, limit_s: float = 600):
    """Poll until cond() is truthy; the limit only turns a hang into a failure, it measures nothing."""
    end = time.monotonic() + limit_s
    while time.monotonic() < end:
        if v := cond():
            return v
        time.sleep(0.5)
    raise AssertionError(f"gave up waiting for {what}")


def test_two_scheduled_rebuilds_then_sigterm(tmp_path):
    corpus = write_foldoc_corpus(tmp_path / "c.jsonl.gz", 20, min_words=40)
    bank = tmp_path / "bank"
    proc = subprocess.Popen(
        schedule_args(corpus, bank, "schedule.cron='*/2 * * * * *'"),
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        done = lambda: [r for r in RunLog(Bank(str(bank))).rows() if r["status"] != "running"]  # noqa: E731
        wait_for(lambda: len(done()) >= 2, "two finished runs")
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out[-3000:]
    assert "SIGTERM: stopping" in out and "schedule: stopped after" in out
    rows = RunLog(Bank(str(bank))).rows()
    assert [r["status"] for r in rows[:2]] == ["published", "up_to_date"], rows  # the 2nd had nothing to do
    assert rows[0]["added"] > 0 and rows[0]["changed"] == rows[0]["removed"] == 0 and rows[0]["tag"] == "live"
    assert all(r["status"] in ("published", "up_to_date", "interrupted") for r in rows)
    for a, b in zip(rows, rows[1:]):
        assert a["ended_at"] <= b["started_at"], "runs overlapped"
    # the runs table is a table like the others: m3 sql sees it
    n = query(Bank(str(bank), live=True), "SELECT count(*) FROM runs WHERE status = 'published'")[1][0][0]
    assert n == 1


def test_failed_run_is_retried_then_given_up(tmp_path):
    bank = tmp_path / "bank"
    out = subprocess.run(
        schedule_args(
            tmp_path / "missing.jsonl.gz",
            bank,
            "schedule.cron='* * * * * *'",
            "schedule.max_retries=2",
            "schedule.backoff_s=0.1",
        )
        + ["--max-runs", "1"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    rows = RunLog(Bank(str(bank))).rows()
    assert [(r["attempt"], r["status"]) for r in rows] == [(0, "failed"), (1, "failed"), (2, "failed")]
    assert all("missing.jsonl.gz" in r["error"] for r in rows)
    assert out.stdout.count("retrying in") == 2


def test_run_finding_the_bank_locked_is_skipped(tmp_path):
    corpus = write_foldoc_corpus(tmp_path / "c.jsonl.gz", 5)
    bank = tmp_path / "bank"
    with BankLock(Bank(str(bank))):
        out = subprocess.run(
            schedule_args(corpus, bank, "schedule.cron='* * * * * *'") + ["--max-runs", "1"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=300,
        )
    assert out.returncode == 0, out.stderr[-3000:]
    rows = RunLog(Bank(str(bank))).rows()
    assert [r["status"] for r in rows] == ["skipped"] and "another rebuild" in rows[0]["error"]
