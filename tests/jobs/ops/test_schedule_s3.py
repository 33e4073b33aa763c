"""`m3 schedule` on a bank at an s3:// URI (the S3 server of the `s3` fixture): the runs table
lives in the bucket, and a run that finds the bank's lock (a conditional PUT there) held is
recorded as skipped, as on a local bank (test_schedule.py)."""

from __future__ import annotations

import subprocess

import pytest

from jobs.ops.lock import BankLock
from storage.bank import Bank
from storage.runs import RunLog
from tests.conftest import ROOT, write_foldoc_corpus
from tests.jobs.ops.test_schedule import schedule_args

pytestmark = pytest.mark.slow


def test_run_finding_the_s3_bank_locked_is_skipped(tmp_path, s3):
    corpus = write_foldoc_corpus(tmp_path / "c.jsonl.gz", 5)
    bank = f"{s3[0]}/schedule-{tmp_path.name}"
    with BankLock(Bank(bank)) as lock:
        assert lock.object_store
        out = subprocess.run(
            schedule_args(corpus, bank, "schedule.cron='* * * * * *'") + ["--max-runs", "1"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=300,
        )
    assert out.returncode == 0, out.stderr[-3000:]
    rows = RunLog(Bank(bank)).rows()
    assert [r["status"] for r in rows] == ["skipped"] and "another rebuild" in rows[0]["error"], rows
    assert f"lock file {bank}/_rebuild.lock" in rows[0]["error"]
