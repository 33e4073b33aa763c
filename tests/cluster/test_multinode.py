"""The whole pipeline submitted with `m3 submit run` to a head and two worker nodes (conftest.py),
run across both, with the bank on a path every node sees; its tables equal a local run's."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest

from tests.cluster.conftest import config_args
from tests.cluster.tables import rows
from tests.conftest import ROOT

pytestmark = pytest.mark.cluster

INGEST_TABLES = ("documents", "rejects", "refs", "train_sequences")


def task_nodes(cluster) -> dict[str, int]:
    """node id -> finished tasks and actor calls there, from the head's State API."""
    code = (
        "import json, collections; from jobs.ops.submit import client; client(%r); "
        "from ray.util.state import list_tasks; "
        "ts = list_tasks(address=%r, filters=[('state', '=', 'FINISHED')], limit=10000, raise_on_missing_output=False); "
        "print(json.dumps(collections.Counter(t.node_id for t in ts)))" % (cluster.address, cluster.address)
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=cluster.env, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_whole_pipeline_runs_on_both_worker_nodes(cluster, pipeline, corpus, tmp_path):
    out, bank = pipeline["stdout"], pipeline["bank"]
    assert re.search(r"job m3-run-\S+ SUCCEEDED", out), out[-3000:]
    report = (bank / "_reports" / "run.md").read_text()
    for stage in ("ingest", "warmup", "embed", "pair", "continual", "encode", "evaluate"):
        assert f"| {stage} |" in report

    # the work was spread: both worker nodes ran tasks (the head has no CPU: it ran none)
    workers = cluster.alive()
    used = task_nodes(cluster)
    for label, node in workers.items():
        assert used.get(node, 0) > 0, (label, used)

    # ingest is deterministic whatever runs it: a local run (embedded Ray) makes the same tables
    local = tmp_path / "local"
    run = subprocess.run(
        [sys.executable, "-m", "jobs", "ingest", *config_args(corpus, local)],
        cwd=ROOT,
        env={k: v for k, v in cluster.env.items() if k != "RAY_ADDRESS"},
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    for table in INGEST_TABLES:
        assert rows(bank, table) == rows(local, table), table
