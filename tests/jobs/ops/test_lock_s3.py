"""The rebuild lock of a bank on an object store (jobs/ops/lock.py): a conditional PUT
(If-None-Match: *) and a conditional DELETE (If-Match), against the S3 server of the `s3`
fixture (tests/conftest.py). The same promises as the local lock (test_lock.py): one holder, a
clear message for the loser, stale locks taken over, and never a lock someone else holds
removed."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time

import pytest

from jobs.ops.lock import BankLock, LockError
from storage.bank import Bank
from storage.conditional import read_versioned, write_if
from tests.storage.racing import race, s3_serial  # noqa: F401 - fixture


@pytest.fixture
def bank(s3_serial, tmp_path):  # noqa: F811 - the imported fixture, by name
    return f"{s3_serial[0]}/lock-{tmp_path.name}"


def lock_object(bank: str) -> dict | None:
    got = read_versioned(f"{bank}/_rebuild.lock")
    return json.loads(got[0]) if got else None


def test_second_taker_fails_fast_naming_the_holder_and_release_frees_it(bank):
    with BankLock(Bank(bank)) as lock:
        assert lock.object_store and str(lock.path) == f"{bank}/_rebuild.lock"
        assert lock_object(bank)["pid"] == __import__("os").getpid()
        with pytest.raises(
            LockError,
            match=rf"another rebuild of this bank is running \(pid \d+ on "
            rf"{socket.gethostname()}, started .*lock file {bank}/_rebuild.lock",
        ):
            BankLock(Bank(bank)).acquire()
    assert lock_object(bank) is None
    with BankLock(Bank(bank)) as again:
        assert again.held


def test_lock_of_a_dead_process_is_taken_over(bank, capsys):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    write_if(
        f"{bank}/_rebuild.lock",
        json.dumps({"pid": dead.pid, "host": socket.gethostname(), "started_at": time.time() - 5}).encode(),
        None,
    )
    with BankLock(Bank(bank)):
        assert lock_object(bank)["pid"] == __import__("os").getpid()
    out = capsys.readouterr().out
    assert "removing stale lock" in out and f"process {dead.pid} no longer exists" in out


def test_other_hosts_lock_is_respected_until_old(bank):
    write_if(
        f"{bank}/_rebuild.lock",
        json.dumps({"pid": 1, "host": "some-other-host", "started_at": time.time() - 60}).encode(),
        None,
    )
    with pytest.raises(LockError, match="some-other-host"):
        BankLock(Bank(bank), stale_after_s=3600).acquire()
    with BankLock(Bank(bank), stale_after_s=30) as lock:
        assert lock.held and lock_object(bank)["host"] == socket.gethostname()


def test_release_leaves_a_lock_that_another_process_took_over(bank, capsys):
    lock = BankLock(Bank(bank))
    lock.acquire()
    # this run outlived rebuild.lock_stale_s and another host took the lock over as stale
    _, etag = read_versioned(lock.path)
    other = {"pid": 1, "host": "other-host", "started_at": time.time()}
    write_if(lock.path, json.dumps(other).encode(), etag)
    lock.release()
    assert lock_object(bank) == other  # compare-and-delete: the new holder's lock stays
    assert "was taken over by another process" in capsys.readouterr().out


def test_concurrent_takers_exactly_one_wins(bank):
    outcomes = race("tests.storage.racing:take_lock", (bank,), n=3)
    assert [what for _, what, _ in outcomes].count("won") == 1, outcomes
    assert all("another rebuild of this bank is running" in r for _, what, r in outcomes if what == "lost"), outcomes
