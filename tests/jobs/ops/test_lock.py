"""The rebuild lock: one holder, a clear message for the loser, stale locks taken over."""

from __future__ import annotations

import json
import multiprocessing as mp
import socket
import subprocess
import sys
import time

import pytest

from jobs.ops.lock import BankLock, LockError


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


def _race(bank: str, barrier, results, done) -> None:
    barrier.wait()
    try:
        lock = BankLock(bank)
        lock.acquire()
        results.put("won")
        done.wait()  # hold it until every taker has tried
        lock.release()
    except LockError:
        results.put("lost")


def test_concurrent_takers_exactly_one_wins(tmp_path):
    ctx = mp.get_context("spawn")
    barrier, results, done = ctx.Barrier(4), ctx.Queue(), ctx.Event()
    procs = [ctx.Process(target=_race, args=(str(tmp_path), barrier, results, done)) for _ in range(4)]
    for p in procs:
        p.start()
    outcomes = sorted(results.get(timeout=120) for _ in procs)
    done.set()
    for p in procs:
        p.join()
    assert outcomes == ["lost", "lost", "lost", "won"]
