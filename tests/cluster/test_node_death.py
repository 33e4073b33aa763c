"""Node death: a worker node (its whole process group) is killed in the middle of ingest, embed,
training and encode, each submitted with `m3 submit`; the job finishes and its tables equal an
uninterrupted run's; training resumes from its last checkpoint.

"In the middle" is made exact with jobs/faults.py's M3_PAUSE_AT: the first process to reach a
point of the stage (a later shard, a step after a checkpoint) says so with a file and waits; the
test kills that process's node, so the kill always takes running work with it. A replacement
node (same resources) is started at once, as an autoscaler would. The stages run one after
another on one bank (module scope), which is what each next stage reads.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from tests.cluster.conftest import config_args, m3
from tests.cluster.tables import rows
from tests.conftest import ROOT

pytestmark = pytest.mark.cluster


@pytest.fixture(scope="module")
def bank(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("death") / "bank"


def submit_and_kill(cluster, tmp: Path, args: list[str], point: str, after: int) -> tuple[str, str]:
    """`m3 submit ... --wait` with a pause at `point`; kill the node that paused, start its
    replacement, let the job go on. Returns (the killed node's label, the submit's output)."""
    marks = tmp / f"pause-{point}"
    marks.mkdir(parents=True)
    log = tmp / f"{point}.out"
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "jobs", "submit", *args, "--address", cluster.address, "--wait"],
            cwd=ROOT,
            env={**cluster.env, "M3_PAUSE_AT": f"{point}:{after}:{marks}"},
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    marker = marks / f"{point}.paused"
    deadline = time.monotonic() + 1500
    while not marker.exists():
        assert proc.poll() is None, f"the job ended before reaching {point}: {log.read_text()[-5000:]}"
        assert time.monotonic() < deadline, f"no process reached {point}: {log.read_text()[-5000:]}"
        time.sleep(0.5)
    node = marker.read_text().split()[0]
    label = {v: k for k, v in cluster.alive().items()}[node]  # a worker node: the head has no CPU
    cluster.kill(label)
    cluster.add_worker(label)
    (marks / "go").touch()  # nothing should be waiting on it: the paused process died with its node
    proc.wait(timeout=1800)
    text = log.read_text()
    assert proc.returncode == 0, text[-5000:]
    assert re.search(r"job \S+ SUCCEEDED", text), text[-5000:]
    return label, text


def test_ingest_survives_a_node_death(cluster, pipeline, corpus, bank, tmp_path):
    submit_and_kill(cluster, tmp_path, ["ingest", *config_args(corpus, bank)], "clean", 1)
    for table in ("documents", "rejects", "refs", "train_sequences"):
        assert rows(bank, table) == rows(pipeline["bank"], table), table


def test_embed_survives_a_node_death(cluster, pipeline, corpus, bank, tmp_path):
    submit_and_kill(cluster, tmp_path, ["embed", *config_args(corpus, bank)], "embed", 1)
    got, want = rows(bank, "embeddings"), rows(pipeline["bank"], "embeddings")
    assert got["ref_id"] == want["ref_id"]
    # the same model on the same references; computed in other processes, so compared as numbers
    np.testing.assert_allclose(np.array(got["vector"]), np.array(want["vector"]), atol=1e-5)


def test_training_resumes_from_its_checkpoint_after_a_node_death(cluster, pipeline, corpus, bank, tmp_path):
    """Killed after step 3 of 6 (checkpoints every 2 steps): the run resumes at step 2, on the
    nodes left, and its loss trajectory is the uninterrupted run's."""
    args = ["train", *config_args(corpus, bank), "--stage-args", "--stage warmup"]
    _, out = submit_and_kill(cluster, tmp_path, args, "train", 3)
    assert "a node of the cluster died under the run; resuming from the last checkpoint" in out
    assert re.search(r"train warmup: steps 2->6", out), out[-5000:]

    def losses(b: Path) -> list[tuple[int, float]]:
        lines = (b / "training" / "warmup" / "log.jsonl").read_text().splitlines()
        return [(r["step"], r["loss"]) for r in map(json.loads, lines)]

    got, want = losses(bank), losses(pipeline["bank"])
    assert [s for s, _ in got] == [1, 2, 3, 4, 5, 6]
    assert [s for s, _ in want] == [s for s, _ in got]
    assert [x for _, x in got] == pytest.approx([x for _, x in want], abs=1e-5, rel=0)


def test_encode_survives_a_node_death(cluster, corpus, bank, tmp_path):
    straight = tmp_path / "straight"
    shutil.copytree(bank, straight)  # the same bank, encoded without a death, is the baseline
    out = m3(cluster, "submit", "encode", *config_args(corpus, straight), "--wait")
    assert out.returncode == 0 and "SUCCEEDED" in out.stdout, out.stdout[-5000:] + out.stderr[-3000:]
    submit_and_kill(cluster, tmp_path, ["encode", *config_args(corpus, bank)], "encode", 1)
    got, want = rows(bank, "memories"), rows(straight, "memories")
    assert len(got["ref_id"]) == len(rows(bank, "refs")["ref_id"]) > 0
    assert got == want
