"""Crash injection for the kill-and-resume tests: production code calls `maybe_crash(point)`.

M3_CRASH_AT="clean:2" makes the driver exit hard once 2 shards of the clean stage are done, as a
`kill -9` would; M3_CRASH_WORKER="<marker dir>" makes the first attempt of every clean-shard task
die (its worker process exits) so Ray has to retry it; M3_PAUSE_AT holds one process of a stage
until a test has killed its node (`maybe_pause`). Unset, each costs one dict lookup.
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


# The fault-injection variables: `m3 submit` hands those set here to the job it submits, so a
# test can inject a fault into a stage that runs on a cluster.
FAULT_ENV = ("M3_CRASH_AT", "M3_CRASH_WORKER", "M3_PAUSE_AT")


def maybe_pause(point: str, done: int) -> None:
    """M3_PAUSE_AT="embed:2:<dir>": the first process (of any node) to reach `point` with `done`
    >= 2 writes <dir>/<point>.paused (its Ray node id) and waits there until <dir>/go exists (or 10
    minutes pass). The node-death tests kill that process's node while it waits, so the kill
    lands in the middle of the stage, inside work that node holds. One pause per point: the
    retried work and every other process go straight on."""
    spec = os.environ.get("M3_PAUSE_AT")
    if not spec:
        return
    name, after, marker_dir = spec.split(":", 2)
    if name != point or done < int(after):
        return
    marker = Path(marker_dir) / f"{point}.paused"
    try:
        fd = os.open(marker.with_suffix(".claim"), os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return  # another process paused (or is pausing) at this point already
    os.close(fd)
    import time

    import ray

    node = ray.get_runtime_context().get_node_id() if ray.is_initialized() else ""
    tmp = marker.with_suffix(".tmp")
    tmp.write_text(f"{node}\n{os.getpid()}\n")
    tmp.rename(marker)  # whole or absent: the test reads it as soon as it appears
    deadline = time.monotonic() + 600
    while not (Path(marker_dir) / "go").exists() and time.monotonic() < deadline:
        time.sleep(0.2)
