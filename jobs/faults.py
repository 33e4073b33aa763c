"""Crash injection for the kill-and-resume tests: production code calls `maybe_crash(point)`.

M3_CRASH_AT="clean:2" makes the driver exit hard once 2 shards of the clean stage are done, as a
`kill -9` would; M3_CRASH_WORKER="<marker dir>" makes the first attempt of every clean-shard task
die (its worker process exits) so Ray has to retry it. Unset, both cost one dict lookup.
"""

from __future__ import annotations

import os
from pathlib import Path


def maybe_crash(point: str, done: int) -> None:
    spec = os.environ.get("M3_CRASH_AT")
    if not spec:
        return
    name, _, after = spec.partition(":")
    if name == point and done >= int(after or 0):
        os._exit(75)  # no cleanup, no flush: the closest thing to SIGKILL from the inside


def maybe_kill_worker(task_id: str) -> None:
    marker_dir = os.environ.get("M3_CRASH_WORKER")
    if not marker_dir:
        return
    marker = Path(marker_dir) / f"{task_id}.crashed"
    if not marker.exists():
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.touch()
        os._exit(1)
