"""One writer per bank at a time: a lock file `<bank>/_rebuild.lock` saying who holds it.

(Here, below the stages and training that take it; jobs/ops/lock.py re-exports it for the
commands and tests that import it from there.)

    @writes_bank("ingest")                       # a stage's run function: the lock around it
    def run_ingest(cfg): ...

    with write_lock(cfg, "rebuild"):             # a command that runs several stages
        run_ingest(cfg); run_encode(cfg); ...

Every command that writes a bank takes the same lock, the one file `_rebuild.lock` (named when
only `m3 rebuild` took it, and kept: a rebuild of an older release and a writer of this one
still exclude each other): `m3 ingest`, `encode`, `embed`, `pair`, `train` (both stages: they
write checkpoints and models under the bank), `rebuild`, `bank compact` and `m3 run`, whether
started by the CLI, `python -m jobs <stage>` (a Ray job of `m3 submit`), `m3 schedule` or
another command. Readers (`m3 sql`, eval, generate, search, stats) take none. The lock file
holds the holder's pid, host, start time and `what` (the command), so a second writer fails at
once with a one-line `LockError` naming it ("another rebuild of this bank is running (pid ...):
not starting ingest"), instead of queueing behind an hour-long build or, as before, both
writing and the last one silently winning.

Reentrant within one thread of a process (`reentrant=True`, what `writes_bank` and
`write_lock` take): `m3 rebuild` and `m3 run` hold the lock while they call run_ingest,
run_encode, ... which take it themselves when called alone; the inner takes only count (a
process-level count keyed by the lock's path). Another thread, or a plain `BankLock`, is another
writer. Training takes it in the driver only (Ray Train workers do not; with a deepspeed or
torchrun launcher, rank 0 does).

Taking it is an exclusive create, so two writers started together cannot both win. How it is
created depends on where the bank is:
- a local or shared file system (a path, file://): one `open(O_CREAT | O_EXCL)`, atomic on a
  local or NFS (v3+) file system;
- an object store (s3://): one conditional PUT, `If-None-Match: *` (storage/conditional.py),
  which the store refuses with 412 if the object exists (S3 since August 2024; the tests run
  against moto's server, which honours it). Released, or removed as stale, by a conditional
  DELETE (`If-Match: <ETag>`): only the object that was read goes, never a lock someone else
  took meanwhile. A store that ignores conditional requests cannot give this guarantee.

A holder killed with -9 leaves the file behind. It is stale, and taken over, when it was written
on this host by a process that no longer exists (or whose pid now belongs to a process started
after the lock was taken: pids are reused); a lock from another host cannot be checked that way
and is taken over only after `stale_after_s` (rebuild.lock_stale_s), which should exceed the
longest rebuild or training run.
"""

from __future__ import annotations

import functools
import json
import os
import socket
import threading
import time
from pathlib import Path
from typing import Callable

from model.errors import M3Error
from storage.bank import Bank
from storage.conditional import PreconditionFailed, read_versioned, remove_if, write_if


class LockError(M3Error, RuntimeError):
    pass


# The one lock file every writer takes: layout.lock(LOCK) = <bank>/_rebuild.lock
LOCK = "rebuild"

# Reentrant holds of this process: lock key -> {"pid", "thread", "depth"} (see the docstring)
_HELD: dict[str, dict] = {}
_HELD_GUARD = threading.Lock()


def _process_start(pid: int) -> float | None:
    """When `pid` started (seconds since the epoch), or None if there is no such process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    except OSError:  # no /proc (macOS): existence only
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        except PermissionError:
            pass
        return 0.0
    ticks = int(stat.rsplit(")", 1)[1].split()[19])  # field 22: start time in clock ticks after boot
    boot = next(
        float(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines() if line.startswith("btime ")
    )
    return boot + ticks / os.sysconf("SC_CLK_TCK")


class BankLock:
    """The bank's write lock, taken as `what` (the command: "ingest", "rebuild", ...)."""

    def __init__(self, bank: Bank, what: str = "rebuild", stale_after_s: float = 24 * 3600, reentrant: bool = False):
        layout = bank.layout
        self.path = layout.lock(LOCK)  # one file for every writer, whatever `what`
        self.object_store = layout.on_object_store()  # no O_EXCL there: a conditional PUT instead
        self.what, self.stale_after_s, self.reentrant = what, stale_after_s, reentrant
        self.held = False
        self._nested = False  # held through an enclosing hold of this thread (reentrant)
        self._key = str(self.path) if self.object_store else os.path.abspath(self.path)
        self._etag: str | None = None  # the version of our lock object (object store)

    def _me(self) -> dict:
        return {"pid": os.getpid(), "host": socket.gethostname(), "started_at": time.time(), "what": self.what}

    def _enter_held(self) -> bool:
        """Reentrant: count one more hold if this thread holds the lock already."""
        with _HELD_GUARD:
            held = _HELD.get(self._key)
            if held and held["pid"] == os.getpid() and held["thread"] == threading.get_ident():
                held["depth"] += 1
                self.held = self._nested = True
                return True
        return False

    def holder(self) -> dict | None:
        return self._read()[0]

    def _read(self) -> tuple[dict | None, str | None]:
        """(holder info, version token) of the lock as it is now; (None, None) if free."""
        if self.object_store:
            got = read_versioned(self.path)
            if got is None:
                return None, None
            try:
                return json.loads(got[0]), got[1]
            except ValueError:  # a PUT is whole: not written by a BankLock; judged by its age
                when = self.path.fs.info(self.path.path)["LastModified"].timestamp()
                return {"unreadable": True, "started_at": when}, got[1]
        try:
            return json.loads(self.path.read_text(encoding="utf-8")), None
        except FileNotFoundError:
            return None, None
        except (ValueError, OSError):
            # empty or half-written: a holder between create and write, or killed right there
            try:
                return {"unreadable": True, "started_at": self.path.stat().st_mtime}, None
            except FileNotFoundError:
                return None, None

    def stale(self, info: dict) -> str | None:
        """Why the lock described by `info` is stale, or None if its holder may still run."""
        if info.get("unreadable"):
            # the writer gets a moment to finish; after that it was killed mid-write
            return "unreadable and older than 10 s" if time.time() - info["started_at"] > 10 else None
        if info.get("host") == socket.gethostname():
            started = _process_start(int(info.get("pid", -1)))
            if started is None:
                return f"process {info.get('pid')} no longer exists"
            if started > float(info.get("started_at", 0)) + 1:
                return f"pid {info.get('pid')} now belongs to a process started after the lock was taken"
            return None
        if time.time() - float(info.get("started_at", 0)) > self.stale_after_s:
            return f"taken more than {self.stale_after_s:.0f} s ago on another host"
        return None

    def _create(self) -> bool:
        """Take the lock if it is free: True if taken, False if it exists."""
        data = json.dumps(self._me())
        if self.object_store:
            try:
                self._etag = write_if(self.path, data.encode("utf-8"), None)
            except PreconditionFailed:
                return False
            return True
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(data)
        return True

    def acquire(self) -> None:
        if self.reentrant and self._enter_held():
            return
        if not self.object_store:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(3):  # a stale lock removed by us, then possibly retaken by another process
            if self._create():
                self.held = True
                if self.reentrant:
                    with _HELD_GUARD:
                        _HELD[self._key] = {"pid": os.getpid(), "thread": threading.get_ident(), "depth": 1}
                return
            info, token = self._read()
            if info is None:
                continue
            reason = self.stale(info)
            if reason is None:
                started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(info.get("started_at", 0))))
                holder = info.get("what", "rebuild")  # a lock file of an older release: a rebuild's
                raise LockError(
                    f"another {holder} of this bank is running (pid {info.get('pid')} on "
                    f"{info.get('host')}, started {started}; lock file {self.path}): not starting "
                    + ("a second one" if holder == self.what else f"{self.what} beside it (one writer per bank)")
                ) from None
            print(f"{self.what}: removing stale lock {self.path} ({reason})", flush=True)
            if self.object_store:
                remove_if(self.path, token)  # only the object we judged stale, not a newer one
            else:
                self._remove_if_same(info)
        raise LockError(f"could not take the {self.what} lock {self.path}: it keeps being retaken")

    def _remove_if_same(self, info: dict) -> None:
        """Remove the lock file only if it still holds `info`: another process may have removed
        the same stale lock and taken a fresh one since we read it. A rename is atomic, so only
        one remover gets the file; one that got a fresh lock by mistake links it back."""
        tomb = self.path.with_name(f"{self.path.name}.stale-{os.getpid()}-{time.monotonic_ns()}")
        try:
            os.rename(self.path, tomb)
        except FileNotFoundError:
            return
        try:
            if json.loads(tomb.read_text(encoding="utf-8") or "null") not in (info, None):
                os.link(tomb, self.path)
        except (FileExistsError, ValueError):
            pass
        tomb.unlink(missing_ok=True)

    def release(self) -> None:
        if not self.held:
            return
        self.held = False
        if self._nested:  # the enclosing hold releases the file
            self._nested = False
            with _HELD_GUARD:
                if self._key in _HELD:
                    _HELD[self._key]["depth"] -= 1
            return
        if self.reentrant:
            with _HELD_GUARD:
                _HELD.pop(self._key, None)
        if not self.object_store:
            self.path.unlink(missing_ok=True)
        elif not remove_if(self.path, self._etag):
            # judged stale (stale_after_s too short for this run) and taken by another process:
            # its lock stays; say so, since two of them ran at once
            print(
                f"{self.what}: the lock {self.path} was taken over by another process while this one "
                f"held it (rebuild.lock_stale_s shorter than this run?); left to its new holder",
                flush=True,
            )

    def __enter__(self) -> "BankLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def _stale_after(cfg) -> float:
    rebuild = getattr(cfg, "rebuild", None)
    return getattr(rebuild, "lock_stale_s", 24 * 3600.0)


def write_lock(cfg, what: str) -> BankLock:
    """The bank's write lock for command `what`, reentrant in this thread: `with write_lock(cfg, "rebuild"):`."""
    return BankLock(Bank.of(cfg), what, _stale_after(cfg), reentrant=True)


def writes_bank(what: str | Callable[..., str | None]):
    """Decorator of a command's run function `fn(cfg, ...)`: it runs holding the bank's write
    lock (reentrant, see the module docstring). `what` names the command, or is a function of
    fn's arguments giving it, or None for a call that takes no lock (a training rank other
    than 0)."""

    def wrap(fn):
        @functools.wraps(fn)
        def locked(cfg, *args, **kwargs):
            name = what(cfg, *args, **kwargs) if callable(what) else what
            if name is None:
                return fn(cfg, *args, **kwargs)
            with write_lock(cfg, name):
                return fn(cfg, *args, **kwargs)

        return locked

    return wrap
