"""A real multi-node Ray cluster on this machine: a head and two worker nodes, each started by
`ray start --block` in a process group of its own, with its own ports, temp dir, object store and
resources (1 CPU and a label, `node_a` / `node_b`), all on loopback (tests/cluster/ray_node.py).

The head has no CPUs: every task, actor and training worker runs on a worker node, so a killed
worker node takes real work with it; the job drivers (Jobs API) run on the head. The bank is a
local directory: on one machine every node sees it, as an NFS mount would on several (a real
cluster: docs/cluster.md, "On a cluster").

Teardown kills this fixture's process groups and nothing else: never a bare `ray stop`, which
stops every Ray on the machine (other tests', other users').
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import psutil
import pytest

from tests.conftest import ROOT
from tests.jobs.ops.test_submit import free_ports, head_env, node_logs, wait_until_jobs_run, worker_port_range

VENV_BIN = Path(sys.executable).parent
WORKERS = ("node_a", "node_b")
OBJECT_STORE = str(100 * 2**20)  # the tiny banks of these tests need little; 2 cores, 24 GB shared


def _ports(tmp: Path, nm: int, om: int, agent: int, agent_grpc: int, metrics: int, rt_env: int, lo: int) -> list[str]:
    """A node's ports (the worker range [lo, lo + 100] clear of them all: worker_port_range)."""
    return [
        f"--node-manager-port={nm}",
        f"--object-manager-port={om}",
        f"--dashboard-agent-listen-port={agent}",
        f"--dashboard-agent-grpc-port={agent_grpc}",
        f"--metrics-export-port={metrics}",
        f"--runtime-env-agent-port={rt_env}",
        f"--min-worker-port={lo}",
        f"--max-worker-port={lo + 100}",
        f"--temp-dir={tmp}",
        "--node-ip-address=127.0.0.1",
        "--object-store-memory=" + OBJECT_STORE,
        "--disable-usage-stats",
        "--block",
    ]


def node_ports(extra: int) -> list[int]:
    """`extra` ports, then _ports' seven: all distinct (one free_ports call), the worker range last."""
    ports = free_ports(extra + 6)
    return [*ports, worker_port_range(100, ports)]


class Cluster:
    def __init__(self, env: dict):
        self.env = env
        self.procs: dict[str, subprocess.Popen] = {}
        self.dirs: list[Path] = []
        self.gcs = self.address = ""

    def _start(self, name: str, args: list[str], ports: list[int], env: dict | None = None) -> subprocess.Popen:
        tmp = Path(tempfile.mkdtemp(prefix=f"m3c{name[-1]}-", dir="/tmp"))  # short: socket paths
        self.dirs.append(tmp)
        proc = subprocess.Popen(
            [sys.executable, str(Path(__file__).parent / "ray_node.py"), "start", *args, *_ports(tmp, *ports)],
            env={**self.env, **(env or {})},
            cwd=ROOT,
            start_new_session=True,
            stdout=open(tmp / "node.log", "w"),
            stderr=subprocess.STDOUT,
        )
        self.procs[name] = proc
        return proc

    def _started(self, name: str, start, attempts: int = 3) -> None:
        """start() until it returns: a node that fails to come up (RuntimeError) is killed and
        started again, at most `attempts` times in all."""
        for attempt in range(attempts):
            try:
                return start()
            except RuntimeError as e:
                print(f"{name}, attempt {attempt + 1} of {attempts}: {e}", file=sys.stderr)
                self.kill(name)
                if attempt == attempts - 1:
                    raise

    def start_head(self) -> None:
        """The head, ready once a job submitted to it runs. A port chosen free a moment ago can be
        taken before Ray binds it: then the head exits and starts again on fresh ports."""
        self._started("head", self._start_head)

    def _start_head(self) -> None:
        gcs, dash, client, *ports = node_ports(3)
        self.gcs, self.address = f"127.0.0.1:{gcs}", f"http://127.0.0.1:{dash}"
        self._start(
            "head",
            [
                "--head",
                f"--port={gcs}",
                "--dashboard-host=127.0.0.1",
                f"--dashboard-port={dash}",
                "--include-dashboard=true",
                f"--ray-client-server-port={client}",
                "--num-cpus=0",
            ],
            ports,
        )
        wait_until_jobs_run(self.procs["head"], self.address, self.env, self.dirs[-1] / "node.log")

    def add_worker(self, name: str) -> None:
        """A worker node with 1 CPU and the resource `name`; returns once the head lists it alive.
        On a loaded machine a raylet can miss its registration deadline: then it starts again."""
        self._started(name, lambda: self._add_worker(name))

    def _add_worker(self, name: str) -> None:
        proc = self._start(
            name,
            [f"--address={self.gcs}", "--num-cpus=1", f"--resources={json.dumps({name: 1})}"],
            node_ports(0),
            # a joining node sends the token only in token mode; registration
            # given more than its 30 s (a loaded 2-core machine)
            env={"RAY_AUTH_MODE": "token", "RAY_raylet_start_wait_time_s": "120"},
        )
        deadline = time.monotonic() + 900  # sized for a loaded 2-core machine
        while name not in self.alive():
            if proc.poll() is not None:
                raise RuntimeError(f"worker {name} exited: {node_logs(self.dirs[-1] / 'node.log')}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"worker {name} did not join {self.gcs} within 900 s")
            time.sleep(1)

    def nodes(self) -> list[dict]:
        """Every node the head knows: id, state, resources (the State API, as the m3 commands reach it)."""
        code = (
            "import json; from jobs.ops.submit import client; client(%r); from ray.util.state import list_nodes; "
            "print(json.dumps([{'id': n.node_id, 'state': n.state, 'resources': n.resources_total} "
            "for n in list_nodes(address=%r, limit=100)]))" % (self.address, self.address)
        )
        problem = ""
        for _ in range(3):  # the State API times out now and then on a loaded 2-core machine
            try:
                out = subprocess.run(
                    [sys.executable, "-c", code], cwd=ROOT, env=self.env, capture_output=True, text=True, timeout=300
                )
            except subprocess.TimeoutExpired:
                problem = "no answer within 300 s"
                continue
            if out.returncode == 0:
                return json.loads(out.stdout.strip().splitlines()[-1])
            problem = out.stderr[-3000:]
        raise RuntimeError(f"the State API at {self.address} did not list the nodes: {problem}")

    def alive(self) -> dict[str, str]:
        """label -> node id of the live worker nodes."""
        return {
            label: n["id"]
            for n in self.nodes()
            if n["state"] == "ALIVE"
            for label in WORKERS
            if label in n["resources"]
        }

    def kill(self, name: str) -> None:
        """Every process of the node, SIGKILL: its process group (raylet, object store, agents)
        and every process descended from it. Ray starts each worker in a process group of its own,
        so the group alone left them to notice their raylet's death by themselves: on a loaded
        machine a paused training worker once had not yet when the test let it go on, saved the
        next checkpoint, and the run resumed from there. A dead machine takes them all at once."""
        proc = self.procs.pop(name)
        try:
            tree = psutil.Process(proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            tree = []
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        for p in tree:
            try:
                p.send_signal(signal.SIGKILL)
            except psutil.NoSuchProcess:
                pass
        proc.wait(timeout=60)
        deadline = time.monotonic() + 60
        for p in tree:  # dead once reaped by whoever inherited it, or a zombie until then
            while time.monotonic() < deadline:
                try:
                    if p.status() == psutil.STATUS_ZOMBIE:
                        break
                except psutil.NoSuchProcess:
                    break
                time.sleep(0.05)

    def stop(self) -> None:
        for name in [n for n in self.procs if n != "head"] + ["head"]:
            if name in self.procs:
                self.kill(name)
        for d in self.dirs:
            shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="session")
def cluster(tmp_path_factory):
    token = tmp_path_factory.mktemp("auth") / "auth_token"
    token.write_text(uuid.uuid4().hex)
    env = {**head_env(token), "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "M3_SUBMIT_TIMEOUT_S": "600"}
    c = Cluster(env)
    try:
        c.start_head()
        for name in WORKERS:
            c.add_worker(name)
        yield c
    finally:
        c.stop()


TINY = [
    "corpus.records_per_shard=40",
    "tokenizer.vocab_size=600",
    "chunking.seq_len=256",
    "model.preset=tiny",
    "model.vocab_size=600",
    "model.ref_max_tokens=128",
    "model.max_seq_len=1024",
    "model.mem_chunk_size=64",
    # one actor per worker node (1 CPU each), shards small enough that every stage has several
    "retrieval.actors=2",
    "retrieval.threads_per_actor=1",
    "retrieval.refs_per_shard=100",
    "encode.actors=2",
    "encode.threads_per_actor=1",
    "encode.refs_per_shard=100",
    "pair.actors=2",
    "pair.threads_per_actor=1",
    "pair.seqs_per_shard=16",
    "train.workers=2",
    "train.cpus_per_worker=0.5",
    "train.warmup_stage_steps=6",
    "train.continual_stage_steps=4",
    "train.checkpoint_every=2",
    "train.lr_warmup_steps=1",
    "train.max_tokens=192",
    "train.eval_sequences=4",
    "pair.max_tokens=192",
    "infer.eval.sequences=4",
    "infer.eval.probe_refs=4",
]


def config_args(corpus: Path, bank: Path, *extra: str) -> list[str]:
    """configs/demo.yaml made tiny, as `m3` arguments: a few hundred references, the tiny model,
    a few training steps."""
    sets = [f"corpus.paths=[{corpus}]", f"bank.uri={bank}", *TINY, *extra]
    return ["-c", "configs/demo.yaml", *[a for s in sets for a in ("--set", s)]]


def m3(cluster: Cluster, *args: str, env: dict | None = None, timeout: float = 1800) -> subprocess.CompletedProcess:
    """An m3 command against the cluster (the Jobs API address), from this machine."""
    return subprocess.run(
        [sys.executable, "-m", "jobs", *args, "--address", cluster.address],
        cwd=ROOT,
        env={**cluster.env, **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> Path:
    from tests.conftest import write_foldoc_corpus

    return write_foldoc_corpus(tmp_path_factory.mktemp("corpus") / "c.jsonl.gz", 120, min_words=60)


@pytest.fixture(scope="session")
def pipeline(cluster, corpus, tmp_path_factory) -> dict:
    """`m3 submit run`: the whole pipeline as one Ray job on the cluster, uninterrupted; the
    baseline the node-death tests compare with."""
    bank = tmp_path_factory.mktemp("pipeline") / "bank"
    out = m3(cluster, "submit", "run", *config_args(corpus, bank), "--wait")
    assert out.returncode == 0, out.stdout[-5000:] + out.stderr[-3000:]
    return {"bank": bank, "stdout": out.stdout}
