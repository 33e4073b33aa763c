"""One rebuild per bank at a time: a lock file `<bank>/_rebuild.lock` holding who took it.

    with BankLock(bank_uri, "rebuild"):
        ...

Taking it is an exclusive create, so two rebuilds started together cannot both win; the loser
fails at once with a `LockError` naming the holder (pid, host, start time), instead of queueing
behind an hour-long build. How it is created depends on where the bank is:
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
longest rebuild.
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

from model.errors import M3Error
from storage.conditional import PreconditionFailed, read_versioned, remove_if, write_if
from storage.layout import BankLayout


class LockError(M3Error, RuntimeError):
    pass


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
    boot = next(float(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines()
                if line.startswith("btime "))
    return boot + ticks / os.sysconf("SC_CLK_TCK")


class BankLock:
    def __init__(self, bank_uri: str, what: str = "rebuild", stale_after_s: float = 24 * 3600):
        layout = BankLayout(bank_uri)
        self.path = layout.lock(what)
        self.object_store = layout.on_object_store()  # no O_EXCL there: a conditional PUT instead
        self.what, self.stale_after_s = what, stale_after_s
        self.held = False
        self._etag: str | None = None  # the version of our lock object (object store)

    def _me(self) -> dict:
        return {"pid": os.getpid(), "host": socket.gethostname(), "started_at": time.time()}

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
        if not self.object_store:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(3):  # a stale lock removed by us, then possibly retaken by another process
            if self._create():
                self.held = True
                return
            info, token = self._read()
            if info is None:
                continue
            reason = self.stale(info)
            if reason is None:
                started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(info.get("started_at", 0))))
                raise LockError(f"another {self.what} of this bank is running (pid {info.get('pid')} on "
                                f"{info.get('host')}, started {started}; lock file {self.path}): "
                                f"not starting a second one") from None
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
        if not self.object_store:
            self.path.unlink(missing_ok=True)
        elif not remove_if(self.path, self._etag):
            # judged stale (stale_after_s too short for this run) and taken by another process:
            # its lock stays; say so, since two of them ran at once
            print(f"{self.what}: the lock {self.path} was taken over by another process while this one "
                  f"held it (rebuild.lock_stale_s shorter than this run?); left to its new holder", flush=True)

    def __enter__(self) -> "BankLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()
