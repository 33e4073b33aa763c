"""The rebuild lock: one holder, a clear message for the loser, stale locks taken over."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time

import pytest

from jobs.ops.lock import BankLock, LockError
from tests.storage.racing import race


def test_second_taker_fails_fast_naming_the_holder(tmp_path):
    with BankLock(str(tmp_path)):
        with pytest.raises(LockError, match=rf"another rebuild of this bank is running \(pid {__import__('os').getpid()} on "
                                            rf"{socket.gethostname()}, started .*lock file"):
            BankLock(str(tmp_path)).acquire()
    BankLock(str(tmp_path)).acquire()  # released on exit: free again


def test_lock_of_a_dead_process_is_taken_over(tmp_path, capsys):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / "_rebuild.lock").write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname(),
                                                        "started_at": time.time() - 5}))
    lock = BankLock(str(tmp_path))
    lock.acquire()
    assert json.loads((tmp_path / "_rebuild.lock").read_text())["pid"] == __import__("os").getpid()
    out = capsys.readouterr().out
    assert "removing stale lock" in out and f"process {dead.pid} no longer exists" in out
    lock.release()


def test_lock_whose_pid_was_reused_is_stale(tmp_path):
    # our own pid, but the lock claims to predate this process's start: a reused pid
    (tmp_path / "_rebuild.lock").write_text(json.dumps({"pid": __import__("os").getpid(),
                                                        "host": socket.gethostname(), "started_at": 1000.0}))
    with BankLock(str(tmp_path)) as lock:
        assert lock.held


def test_other_hosts_lock_is_respected_until_old(tmp_path):
    info = {"pid": 1, "host": "some-other-host", "started_at": time.time() - 60}
    (tmp_path / "_rebuild.lock").write_text(json.dumps(info))
    with pytest.raises(LockError, match="some-other-host"):
        BankLock(str(tmp_path), stale_after_s=3600).acquire()
    with BankLock(str(tmp_path), stale_after_s=30) as lock:
        assert lock.held


def test_concurrent_takers_exactly_one_wins(tmp_path):
    outcomes = race("tests.storage.racing:take_lock", (str(tmp_path),), n=4)
    assert sorted(what for _, what, _ in outcomes) == ["lost", "lost", "lost", "won"], outcomes
    assert all("another rebuild of this bank is running" in r for _, what, r in outcomes if what == "lost"), outcomes
