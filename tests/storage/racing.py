"""Racing writers: `race` runs several processes that try the same conditional step at once, and
the `s3_serial` fixture makes the suite's S3 server (moto's, tests/conftest.py) deciding one
PutObject or DeleteObject at a time.

moto honours `If-None-Match: *` and `If-Match` (412 PreconditionFailed), but checks the condition
and then stores the object with no lock between (moto/s3/responses.py, put_object), so two
requests on two of its server threads could in principle both pass the check; S3 decides a
conditional write of one key atomically. Tests of "exactly one of several concurrent writers
wins" run with this fixture, so what they test is our protocol and not moto's check-then-act.
(Without it, 300 rounds of 4 racing conditional PUTs gave no double winner either.)
"""

from __future__ import annotations

import importlib
import multiprocessing as mp
import threading

import pytest


def _racer(target: str, args: tuple, barrier, results, done, me: int) -> None:
    module, name = target.rsplit(":", 1)
    fn = getattr(importlib.import_module(module), name)
    barrier.wait()
    try:
        results.put((me, "won", str(fn(*args, me))))
    except Exception as e:  # noqa: BLE001 - the loser's error is the outcome
        results.put((me, "lost", f"{type(e).__name__}: {e}"))
    done.wait(300)  # a winner holds what it won (a lock) until every racer has tried


def write_as(path: str, expect, me: int) -> str:
    """One racer's conditional write (storage/conditional.py) of its own content."""
    from storage.conditional import write_if

    return write_if(path, f"writer {me}".encode(), expect)


def take_lock(bank: str, me: int) -> str:
    """One racer taking the bank's lock (jobs/ops/lock.py), held until the race is over."""
    from jobs.ops.lock import BankLock
    from storage.bank import Bank

    BankLock(Bank(bank)).acquire()
    return "held"


def race(target: str, args: tuple, n: int = 3) -> list[tuple]:
    """Run `module:function(*args, me)` in n spawned processes released together; returns
    (me, "won" | "lost", result or error) per process. The target lives in a light module: each
    process imports it (spawn: the S3 endpoint comes from the environment, not a forked client)."""
    ctx = mp.get_context("spawn")
    barrier, results, done = ctx.Barrier(n), ctx.Queue(), ctx.Event()
    procs = [ctx.Process(target=_racer, args=(target, args, barrier, results, done, i)) for i in range(n)]
    for p in procs:
        p.start()
    outcomes = sorted(results.get(timeout=300) for _ in procs)
    done.set()
    for p in procs:
        p.join()
    return outcomes


@pytest.fixture
def s3_serial(s3, monkeypatch):
    from moto.s3.responses import S3Response

    lock = threading.Lock()
    for name in ("put_object", "delete_object"):

        def serial(self, _orig=getattr(S3Response, name)):
            with lock:
                return _orig(self)

        monkeypatch.setattr(S3Response, name, serial)
    return s3
