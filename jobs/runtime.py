"""Starting (or joining) Ray the same way from every entry point."""

from __future__ import annotations

import logging
import os
import re
import sys
import time
import warnings

from jobs.config import RayConfig

# Whether this process started its embedded cluster without the dashboard (init_ray's dashboard=False).
_BARE = False


def init_ray(cfg: RayConfig, *, dashboard: bool = True):
    """Join `cfg.address` if set; otherwise start an embedded cluster bound to loopback only.

    dashboard=False: this caller needs no dashboard (ingest's plain tasks read no State API), so
    an embedded cluster starts without it (`include_dashboard=False`, Ray's documented switch):
    its server and the nine head processes it forks are most of a second of CPU each start on
    2 cores (BENCHMARKS.md, "Whole commands against their stages"). A later caller in the same
    process that wants it (training after ingest in `m3 run`) gets the cluster restarted with
    it; `cfg.include_dashboard` false still means never."""
    global _BARE
    if not cfg.address:
        # Ray resolves even an explicit 127.0.0.1 to the machine's routable address and binds
        # its servers there, unless single-machine mode is on: Ray's own switch for it is this
        # variable (named for the platforms where it is the default). Read when Ray is imported
        # and by the processes it starts, so it is set before either.
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
        if "ray" in sys.modules:  # imported before us: its constant was read already
            from ray._private import ray_constants

            ray_constants.ENABLE_RAY_CLUSTER = False
    import ray

    want = cfg.include_dashboard and dashboard
    if ray.is_initialized():
        if not (_BARE and want):
            return ray
        ray.shutdown()  # nothing of the caller before is running on it: it finished
    # Ray starts its processes with fork+exec; the exec makes lance's fork warning moot.
    warnings.filterwarnings("ignore", message=".*(lance is not fork-safe|lancedb fork support).*")
    # A driver that only submits work needs no log spam from every worker's import of torch.
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    if cfg.address:
        ray.init(address=cfg.address, logging_level=logging.WARNING)
        return ray
    # Ray's State API client finds "the" cluster by scanning the machine and gives up when it
    # finds two (another user's, a test's). Ray Train's placement-group cleaner uses it from
    # inside our cluster; pointing our processes at our own dashboard keeps it from tearing a
    # healthy run down. The driver's environment is left alone: it may talk to other clusters.
    port = free_port() if want else None
    env = {"RAY_API_SERVER_ADDRESS": f"http://127.0.0.1:{port}"} if port else {}
    ray.init(
        num_cpus=cfg.num_cpus,
        include_dashboard=want,
        dashboard_host="127.0.0.1",
        dashboard_port=port or 8265,
        _node_ip_address="127.0.0.1",
        object_store_memory=cfg.object_store_mb * 2**20 if cfg.object_store_mb else None,
        logging_level=logging.WARNING,
        configure_logging=True,
        runtime_env={"env_vars": env} if env else None,
    )
    _BARE = cfg.include_dashboard and not want
    return ray


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def dashboard_url() -> str | None:
    """This driver's cluster's dashboard (State and Jobs API), if it runs one and we started it."""
    import ray

    node = ray._private.worker.global_worker.node if ray.is_initialized() else None
    url = node.address_info.get("webui_url") if node is not None else None
    return f"http://{url}" if url else None


def quiet_ray_data() -> None:
    import ray

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = os.environ.get("M3_PROGRESS", "1") == "1"
    ctx.print_on_execution_start = False
    # Without a terminal Ray Data logs a progress table every few seconds at INFO.
    logging.getLogger("ray.data").setLevel(logging.WARNING)


def wait_for_state_api(seconds: float = 120) -> str | None:
    """None once this Ray session's State API answers; else the last error. The dashboard that
    serves it starts after ray.init returns, slowly on a loaded machine."""
    import time

    url = dashboard_url()
    if url is None:
        return None  # a cluster we joined: its operators run its dashboard
    from ray.util.state import list_nodes

    deadline, problem = time.monotonic() + seconds, None
    while time.monotonic() < deadline:
        try:
            list_nodes(address=url, limit=1, timeout=10)
            return None
        except Exception as e:  # connection refused while it starts, timeouts under load
            problem = f"{type(e).__name__}: {str(e)[:200]}"
            time.sleep(2)
    return problem


# OpenMP threads that spin while waiting collapse a 2-thread actor on a shared 2-core machine
# (measured 3.1x slower); torch reads this when it is imported, so it goes in the actor's env.
PASSIVE_OMP = {"env_vars": {"OMP_WAIT_POLICY": "PASSIVE"}}


def row_shards(n_rows: int, per: int) -> list[tuple[int, int, int]]:
    """(shard, first row, end row) ranges of a table: the unit of staging and of resumption."""
    return [(i, lo, min(n_rows, lo + per)) for i, lo in enumerate(range(0, n_rows, per))]


def run_actor_shards(
    stage: str, shards: list[tuple[int, int, int]], actor_cls, *, actors: int, threads: int, **actor_kwargs
) -> None:
    """Hand row-range shards to a pool of Ray Data actors (`actor_cls(threads=threads,
    **actor_kwargs)`, loaded once per actor, each given `threads` CPUs); each actor writes its
    shard's staging file itself. Used by encode, embed and pair."""
    from jobs.faults import maybe_crash
    from jobs.progress import Progress

    if not shards:
        return
    import ray

    rows = {i: b - a for i, a, b in shards}
    progress = Progress(stage, len(shards), sum(rows.values()))

    if os.environ.get("M3_PAUSE_AT"):  # the node-death tests (jobs/faults.py); never in production
        actor_cls = _pausing(stage, actor_cls)
    ds = ray.data.from_items(
        [{"shard": i, "start": a, "end": b} for i, a, b in shards], override_num_blocks=len(shards)
    )
    ds = ds.map_batches(
        actor_cls,
        batch_size=1,
        num_cpus=threads,
        runtime_env=PASSIVE_OMP,
        compute=ray.data.ActorPoolStrategy(size=actors),
        fn_constructor_kwargs=dict(actor_kwargs, threads=threads),
    )
    for n, row in enumerate(ds.iter_rows(), 1):
        progress.step(rows=rows.get(int(row["shard"]), 0))
        maybe_crash(stage, n)


def _pausing(stage: str, actor_cls):
    """actor_cls whose call on the shard numbered M3_PAUSE_AT's count or later may pause inside the
    actor (on its node) until a test has killed that node."""
    from jobs.faults import maybe_pause

    class Pausing(actor_cls):
        def __call__(self, batch):
            maybe_pause(stage, int(batch["shard"][0]))
            return super().__call__(batch)

    Pausing.__name__ = Pausing.__qualname__ = actor_cls.__name__
    return Pausing


# A node lost under a run (killed, crashed, its machine gone) says nothing about the training:
# the run resumes from its last checkpoint on the nodes left, this many times.
NODE_LOSS_RETRIES = 3
_NODE_DIED = re.compile(r"node (has )?died|NodeDiedError|node [0-9a-f]+ .*(is )?dead", re.I)


def node_lost(e: BaseException, wait_s: float = 120) -> bool:
    """Whether Ray Train failed because a node under it died, not because a worker raised or
    exited on its own. Ray Train's health check usually sees the dead node's workers first, as
    unreachable ("actor ... is unavailable"), before the cluster has declared the node dead
    (missed heartbeats, tens of seconds): then the nodes of those workers are watched until one
    is declared dead, or `wait_s` passes. A worker that exits or raises is never unavailable."""
    failures = getattr(e, "worker_failures", None) or {}
    text = "\n".join(str(x) for x in (e, *failures.values()))
    if _NODE_DIED.search(text):
        return True
    if "is unavailable" not in text:
        return False
    nodes = set(re.findall(r"node_id='([0-9a-f]+)'", text))
    import ray

    deadline = time.monotonic() + wait_s
    while nodes:
        if nodes & {n["NodeID"] for n in ray.nodes() if not n["Alive"]}:
            return True
        if time.monotonic() > deadline:
            break
        time.sleep(2)
    return False
