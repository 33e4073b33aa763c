"""`m3 submit / jobs / logs / stop` against a real Ray cluster this module starts and stops.

The head runs on 127.0.0.1 with its own ports and temp dir (not the session's embedded Ray, not
anyone else's cluster), under `ray start --block` in a process group of its own, so tearing it
down stops exactly what this test started. Token auth is on, with a token this test generates
(RAY_AUTH_TOKEN_PATH), and the m3 commands get no auth setup of their own.
"""

from __future__ import annotations

import os
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


@pytest.fixture(scope="module")
def head(tmp_path_factory):
    tmp = Path(tempfile.mkdtemp(prefix="m3ray-", dir="/tmp"))  # short: Ray's socket paths have a length limit
    token = tmp_path_factory.mktemp("auth") / "auth_token"
    token.write_text(uuid.uuid4().hex)
    # no drain on SIGTERM: it exists for Serve replicas, and would add 30 s to the teardown
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_TOKEN_PATH": str(token),
           "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0",
           "PATH": f"{VENV_BIN}:{os.environ['PATH']}", "M3_PROGRESS": "0"}
    env.pop("RAY_AUTH_MODE", None)
    env.pop("RAY_ADDRESS", None)
    gcs, dash, client, nm, om, agent, agent_grpc, metrics, rt_env = free_ports(9)
    lo = free_ports(1)[0]
    cmd = [str(VENV_BIN / "ray"), "start", "--head", "--block", "--node-ip-address=127.0.0.1",
           f"--port={gcs}", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", "--include-dashboard=true",
           f"--ray-client-server-port={client}", f"--node-manager-port={nm}", f"--object-manager-port={om}",
           f"--dashboard-agent-listen-port={agent}", f"--dashboard-agent-grpc-port={agent_grpc}",
           f"--metrics-export-port={metrics}", f"--runtime-env-agent-port={rt_env}",
           f"--min-worker-port={lo}", f"--max-worker-port={lo + 200}", f"--temp-dir={tmp}",
           "--num-cpus=2", "--disable-usage-stats"]
    proc = subprocess.Popen(cmd, env=env, cwd=ROOT, start_new_session=True,
                            stdout=open(tmp / "head.log", "w"), stderr=subprocess.STDOUT)
    address = f"http://127.0.0.1:{dash}"
    try:
        for _ in range(240):  # the Jobs API answers once the dashboard is up
            if proc.poll() is not None:
                raise RuntimeError(f"ray start exited: {(tmp / 'head.log').read_text()[-3000:]}")
            try:
                urllib.request.urlopen(f"{address}/api/version", timeout=2)
                break
            except urllib.error.HTTPError:  # answering (401 without the token): up
                break
            except OSError:
                time.sleep(0.5)
        else:
            raise RuntimeError(f"the dashboard at {address} did not come up")
        yield {"address": address, "env": env}
    finally:
        proc.send_signal(signal.SIGTERM)  # --block: ray start stops the node it started
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            pass
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # anything of ours left: our own process group only
        except ProcessLookupError:
            pass
        shutil.rmtree(tmp, ignore_errors=True)


def m3(head, *args: str, ok: bool = True) -> subprocess.CompletedProcess:
    out = subprocess.run([sys.executable, "-m", "jobs.cli", *args, "--address", head["address"]],
                         cwd=ROOT, env=head["env"], capture_output=True, text=True, timeout=300)
    if ok:
        assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out


def config_args(tmp: Path, n: int) -> list[str]:
    corpus = write_foldoc_corpus(tmp / f"c{n}.jsonl.gz", n, min_words=40)
    sets = [f"corpus.paths=[{corpus}]", f"bank.uri={tmp / f'bank{n}'}", "tokenizer.vocab_size=600",
            "chunking.seq_len=256", "model.preset=tiny", "model.vocab_size=600", "model.max_seq_len=512",
            "model.ref_max_tokens=128"]
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
    out = m3(head, "logs", "m3-no-such-job", ok=False)
    assert out.returncode == 2 and "no job 'm3-no-such-job'" in out.stderr
    port = free_ports(1)[0]
    out = subprocess.run([sys.executable, "-m", "jobs.cli", "jobs", "--address", f"http://127.0.0.1:{port}"],
                         cwd=ROOT, env=head["env"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "no Ray Jobs API at" in out.stderr and "Traceback" not in out.stderr


def test_schedule_runs_rebuilds_as_ray_jobs(head, tmp_path_factory):
    """With an address each scheduled run is a Ray job; the second finds the same inputs already
    built by a job that succeeded, so it is a no-op."""
    from storage.runs import RunLog

    tmp = tmp_path_factory.mktemp("sched")
    cfg = config_args(tmp, 25)
    extra = ["--set", "schedule.cron='* * * * * *'", "--set", "rebuild.embeddings=false", "--max-runs", "2"]
    out = m3(head, "schedule", *cfg, *extra)
    assert "as Ray jobs at" in out.stdout and "stopped after 2 run(s)" in out.stdout
    rows = RunLog(str(tmp / "bank25")).rows()
    assert [(r["mode"], r["status"]) for r in rows] == [("ray-job", "published"), ("ray-job", "up_to_date")], rows
    assert rows[0]["job_id"].startswith("m3-rebuild-") and rows[0]["job_id"] == rows[1]["job_id"]
    assert rows[0]["added"] > 0 and rows[0]["versions"]
