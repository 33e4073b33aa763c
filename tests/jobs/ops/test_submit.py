"""`m3 submit / jobs / logs / stop` against a real Ray cluster this module starts and stops.

The head runs on 127.0.0.1 with its own ports and temp dir (not the session's embedded Ray, not
anyone else's cluster), under `ray start --block` in a process group of its own, so tearing it
down stops exactly what this test started. Token auth is on, with a token this test generates
(RAY_AUTH_TOKEN_PATH), and the m3 commands get no auth setup of their own. The head starts as the
README says (`.venv/bin/ray start`), without the .venv on PATH: the `python` there is not the
project's, and the jobs find the project's interpreter and packages on their own
(jobs/ops/submit.py `entrypoint`, `runtime_env`).
"""

from __future__ import annotations

import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pytest

from storage.bank import Bank
from tests.conftest import ROOT, write_foldoc_corpus

pytestmark = pytest.mark.slow

VENV_BIN = Path(sys.executable).parent


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def worker_port_range(width: int, taken: list[int]) -> int:
    """The first port of a worker port range [lo, lo + width] that holds none of `taken` and lies
    below the kernel's ephemeral range (where free_ports' ports, and every other process's, come
    from). Ray refuses to start a node whose worker range holds one of its other ports ("trying to
    use a port number ... used by other components"): a range drawn like the other ports held one
    about once in 30 node starts, and the head of CI's cluster exited at once."""
    ephemeral_lo = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    rng = random.Random()
    while True:
        lo = rng.randrange(10000, max(10001, ephemeral_lo - width - 1))
        if not any(lo <= p <= lo + width for p in taken):
            return lo


def start_head(env: dict, tmp: Path) -> tuple[subprocess.Popen, str]:
    """`ray start --head --block` on loopback, in a process group of its own, on ports free a
    moment ago; returns at once (the cluster is still starting)."""
    ports = free_ports(9)
    gcs, dash, client, nm, om, agent, agent_grpc, metrics, rt_env = ports
    lo = worker_port_range(200, ports)
    cmd = [
        str(VENV_BIN / "ray"),
        "start",
        "--head",
        "--block",
        "--node-ip-address=127.0.0.1",
        f"--port={gcs}",
        "--dashboard-host=127.0.0.1",
        f"--dashboard-port={dash}",
        "--include-dashboard=true",
        f"--ray-client-server-port={client}",
        f"--node-manager-port={nm}",
        f"--object-manager-port={om}",
        f"--dashboard-agent-listen-port={agent}",
        f"--dashboard-agent-grpc-port={agent_grpc}",
        f"--metrics-export-port={metrics}",
        f"--runtime-env-agent-port={rt_env}",
        f"--min-worker-port={lo}",
        f"--max-worker-port={lo + 200}",
        f"--temp-dir={tmp}",
        "--num-cpus=2",
        "--disable-usage-stats",
    ]
    proc = subprocess.Popen(
        cmd, env=env, cwd=ROOT, start_new_session=True, stdout=open(tmp / "head.log", "w"), stderr=subprocess.STDOUT
    )
    return proc, f"http://127.0.0.1:{dash}"


def stop_head(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGTERM)  # --block: ray start stops the node it started
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # anything of ours left: our own process group only
    except ProcessLookupError:
        pass


def wait_until_jobs_run(proc: subprocess.Popen, address: str, env: dict, log: Path, deadline_s: float = 300) -> None:
    """Ready means the part the tests use answers: a job submitted through the Jobs API runs to
    its end (the dashboard alone answers before the head's job agent can take a job). Deadlines
    are sized for a loaded 2-core machine; a head that dies (a port taken meanwhile by another
    cluster) fails at once, with what its logs say (`log`: the output of `ray start`, in the
    node's temp dir)."""
    code = (
        "import os, sys; sys.path.insert(0, os.getcwd()); from jobs.ops.submit import Jobs; "
        f"j = Jobs({address!r}, {deadline_s}); sid = j.submit_job(entrypoint='python -c pass'); import time\n"
        f"while j.get_job_status(sid).value not in ('SUCCEEDED', 'FAILED', 'STOPPED'): time.sleep(0.5)\n"
        f"assert j.get_job_status(sid).value == 'SUCCEEDED'"
    )
    probe = subprocess.Popen(
        [sys.executable, "-c", code], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    deadline = time.monotonic() + deadline_s
    while probe.poll() is None:
        if proc.poll() is not None:
            probe.kill()
            raise RuntimeError(f"ray start exited ({proc.returncode}): {node_logs(log)}")
        if time.monotonic() > deadline:
            probe.kill()
            raise RuntimeError(f"no job ran at {address} within {deadline_s} s: {node_logs(log)}")
        time.sleep(0.5)
    if probe.returncode != 0:
        raise RuntimeError(f"the probe job failed at {address}: {probe.stdout.read()[-3000:]}")


def node_logs(log: Path, tail: int = 2000) -> str:
    """The end of `ray start`'s output and of the error logs of the session it started (GCS,
    raylet, dashboard), so that a node that dies at start says why."""
    parts = [f"{log.name}: {log.read_text(errors='replace')[-tail:]}" if log.exists() else f"{log}: missing"]
    logs = log.parent / "session_latest" / "logs"
    for name in ("gcs_server.err", "gcs_server.out", "raylet.err", "raylet.out", "dashboard.err", "dashboard.log"):
        f = logs / name
        if f.exists() and f.stat().st_size:
            parts.append(f"{name}: {f.read_text(errors='replace')[-tail:]}")
    return "\n".join(parts)


def head_env(token: Path, venv_on_path: bool = True) -> dict:
    """`venv_on_path` False: as the README starts a head (`.venv/bin/ray start`), the .venv's bin
    nowhere on PATH."""
    path = [p for p in os.environ["PATH"].split(os.pathsep) if Path(p) != VENV_BIN]
    # no drain on SIGTERM: it exists for Serve replicas, and would add 30 s to the teardown
    env = {
        **os.environ,
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
        "RAY_AUTH_TOKEN_PATH": str(token),
        "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0",
        "PATH": os.pathsep.join([str(VENV_BIN)] * venv_on_path + path),
        "M3_PROGRESS": "0",
        "M3_SUBMIT_TIMEOUT_S": "240",
    }
    if not venv_on_path:
        env.pop("VIRTUAL_ENV", None)
    env.pop("RAY_AUTH_MODE", None)
    env.pop("RAY_ADDRESS", None)
    return env


@pytest.fixture(scope="module")
def head(tmp_path_factory):
    token = tmp_path_factory.mktemp("auth") / "auth_token"
    token.write_text(uuid.uuid4().hex)
    env = head_env(token, venv_on_path=False)
    for attempt in range(3):  # a port chosen free can be taken by another cluster before ray binds it
        tmp = Path(tempfile.mkdtemp(prefix="m3ray-", dir="/tmp"))  # short: Ray's socket paths have a length limit
        proc, address = start_head(env, tmp)
        try:
            wait_until_jobs_run(proc, address, env, tmp / "head.log")
            break
        except RuntimeError:
            stop_head(proc)
            shutil.rmtree(tmp, ignore_errors=True)
            if attempt == 2:
                raise
    try:
        yield {"address": address, "env": env, "token": token}
    finally:
        stop_head(proc)
        shutil.rmtree(tmp, ignore_errors=True)


def m3(head, *args: str, ok: bool = True) -> subprocess.CompletedProcess:
    out = subprocess.run(
        [sys.executable, "-m", "jobs", *args, "--address", head["address"]],
        cwd=ROOT,
        env=head["env"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    if ok:
        assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out


def config_args(tmp: Path, n: int) -> list[str]:
    corpus = write_foldoc_corpus(tmp / f"c{n}.jsonl.gz", n, min_words=40)
    sets = [
        f"corpus.paths=[{corpus}]",
        f"bank.uri={tmp / f'bank{n}'}",
        "tokenizer.vocab_size=600",
        "chunking.seq_len=256",
        "model.preset=tiny",
        "model.vocab_size=600",
        "model.max_seq_len=512",
        "model.ref_max_tokens=128",
    ]
    return ["-c", "configs/demo.yaml", *[a for s in sets for a in ("--set", s)]]


def test_token_auth_is_on(head):
    """Without the token the Jobs API refuses: the m3 commands below pass because they send it."""
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(f"{head['address']}/api/jobs/", timeout=10)
    assert e.value.code == 401


def test_submit_runs_the_stage_and_resubmitting_is_a_noop(head, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("submit")
    cfg = config_args(tmp, 30)
    first = m3(head, "submit", "ingest", *cfg, "--wait")
    sid = re.search(r"submitted ingest as job (\S+)", first.stdout).group(1)
    assert f"job {sid} SUCCEEDED" in first.stdout
    assert "ingest report" in first.stdout  # the job's own output, streamed back
    assert (tmp / "bank30" / "refs.lance").exists()  # the job wrote the bank the config names
    again = m3(head, "submit", "ingest", *cfg)
    assert f"already succeeded as job {sid}; nothing to do" in again.stdout

    listed = m3(head, "jobs", "--format", "csv").stdout
    assert re.search(rf"^{re.escape(sid)},SUCCEEDED,ingest,", listed, re.M), listed
    logs = m3(head, "logs", sid).stdout
    assert "ingest report" in logs and "accounting        OK" in logs


def test_stop_and_resubmit_after_a_stopped_job(head, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("stop")
    cfg = config_args(tmp, 31)
    sub = m3(head, "submit", "ingest", *cfg)
    sid = re.search(r"as job (\S+)", sub.stdout).group(1)
    assert "stop requested" in m3(head, "stop", sid).stdout
    final = m3(head, "logs", sid, "--follow")  # returns when the job has ended
    assert final.returncode == 0
    listed = m3(head, "jobs", "--format", "csv").stdout
    assert re.search(rf"^{re.escape(sid)},STOPPED,", listed, re.M), listed
    retry = m3(head, "submit", "ingest", *cfg)  # a stopped job is not "done": submitted again, new id
    assert f"submitted ingest as job {sid}-r1" in retry.stdout
    m3(head, "stop", f"{sid}-r1")


def test_unknown_job_and_unreachable_cluster_are_one_line_errors(head):
    for cmd in ("logs", "stop"):
        out = m3(head, cmd, "m3-no-such-job", ok=False)
        assert out.returncode == 2 and "no job 'm3-no-such-job'" in out.stderr and "Traceback" not in out.stderr
    port = free_ports(1)[0]
    out = subprocess.run(
        [sys.executable, "-m", "jobs", "jobs", "--address", f"http://127.0.0.1:{port}", "--timeout", "3"],
        cwd=ROOT,
        env=head["env"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 2 and "no Ray Jobs API at" in out.stderr and "Traceback" not in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1 and "--timeout" in out.stderr
    # it retried the refused connection until its deadline (jobs/ops/submit.py retrying: said only
    # once the next backoff would pass the deadline; was a wall-clock bound, flaky and 0.3 s off
    # by design, since the last wait that would overshoot is not taken)
    assert "still failing after 3 s" in out.stderr


def test_submit_to_a_head_started_a_moment_ago(head, tmp_path_factory):
    """No waiting for the cluster: `m3 submit --wait` rides out the refused connections, the
    dashboard coming up and "No available agent to submit job", and the job runs."""
    tmp = Path(tempfile.mkdtemp(prefix="m3ray-", dir="/tmp"))
    proc, address = start_head(head["env"], tmp)
    try:
        work = tmp_path_factory.mktemp("early")
        out = subprocess.run(
            [sys.executable, "-m", "jobs", "submit", "ingest", *config_args(work, 12), "--address", address, "--wait"],
            cwd=ROOT,
            env=head["env"],
            capture_output=True,
            text=True,
            timeout=900,
        )  # a loaded 2-core machine
        assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
        assert "SUCCEEDED" in out.stdout and "Traceback" not in out.stderr
        assert (work / "bank12" / "refs.lance").exists()
    finally:
        stop_head(proc)
        shutil.rmtree(tmp, ignore_errors=True)


def test_transient_errors_are_retried_and_others_are_not():
    """The classification the retry relies on, on the messages Ray's client raises."""
    import requests

    from jobs.ops.submit import SubmitError, retrying, transient

    assert transient(
        RuntimeError("Request failed with status code 500: No available agent to submit job, please try again later.")
    )
    assert transient(requests.exceptions.ConnectionError("('Connection aborted.', RemoteDisconnected(...))"))
    assert transient(ConnectionError("Failed to connect to Ray at address: http://127.0.0.1:1."))
    assert not transient(RuntimeError("Request failed with status code 404: Job m3-x does not exist."))
    assert not transient(RuntimeError("Request failed with status code 401: unauthorized"))
    calls = []

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise RuntimeError("Request failed with status code 503: try again")
        return "ok"

    assert retrying("x", flaky, deadline_s=30) == "ok" and len(calls) == 3
    with pytest.raises(SubmitError, match="still failing after 1 s"):
        retrying("x", lambda: (_ for _ in ()).throw(RuntimeError("status code 502")), deadline_s=1)
    with pytest.raises(RuntimeError, match="404"):
        retrying("x", lambda: (_ for _ in ()).throw(RuntimeError("status code 404")), deadline_s=30)


def test_schedule_runs_rebuilds_as_ray_jobs(head, tmp_path_factory):
    """With an address each scheduled run is a Ray job; the second finds the same inputs already
    built by a job that succeeded, so it is a no-op."""
    from storage.runs import RunLog

    tmp = tmp_path_factory.mktemp("sched")
    cfg = config_args(tmp, 25)
    extra = ["--set", "schedule.cron='* * * * * *'", "--set", "rebuild.embeddings=false", "--max-runs", "2"]
    out = m3(head, "schedule", *cfg, *extra)
    assert "as Ray jobs at" in out.stdout and "stopped after 2 run(s)" in out.stdout
    rows = RunLog(Bank(str(tmp / "bank25"))).rows()
    assert [(r["mode"], r["status"]) for r in rows] == [("ray-job", "published"), ("ray-job", "up_to_date")], rows
    assert rows[0]["job_id"].startswith("m3-rebuild-") and rows[0]["job_id"] == rows[1]["job_id"]
    assert rows[0]["added"] > 0 and rows[0]["versions"]
