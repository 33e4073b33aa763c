"""bench/gpu.sh's CPU dry run (issue 30): the script a lent GPU machine runs once, so every
section must work before it gets there. On CPU it runs the tiny preset in seconds; every figure
the issue asks for must be printed and written with a finite value and its bound from the same
run, and what CPU cannot measure (CUDA graphs) must say so."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

BOUNDS = ["memory bandwidth", "matmul rate", "weights read per decode step"]
DECODE = [f"{mode}, {path}" for mode in ("none", "memory", "rag") for path in ("eager", "static, eager")]
FORWARD = ["no memory", "with memory, dense mask", "with memory, FlexAttention", "with memory, chunk-local"]
ENCODE = ["references, top-4", "references, dense (no score)"]


def finite(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def test_cpu_dry_run_prints_and_writes_every_figure_with_its_bound(tmp_path):
    out = tmp_path / "gpu.json"
    run = subprocess.run(
        ["bash", "bench/gpu.sh", "--device", "cpu", "--out", str(out)],
        cwd=ROOT,
        env={**os.environ, "PYTHON": sys.executable},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    data = json.loads(out.read_text())
    assert "failed" not in data["info"]
    figures = {f["name"]: f for f in data["figures"]}

    def named(prefix):
        hits = [f for name, f in figures.items() if name.startswith(prefix)]
        assert len(hits) == 1, (prefix, sorted(figures))
        return hits[0]

    for prefix in BOUNDS:  # the bounds themselves: measured, positive
        assert finite(named(prefix)["value"]) and named(prefix)["value"] > 0
    for prefix in DECODE + FORWARD + ENCODE:
        f = named(prefix)
        assert finite(f["value"]) and f["value"] > 0, f
        assert finite(f["bound"]) and f["bound"] > 0 and finite(f["fraction"]), f
        assert f"| {f['section']} | {f['name']} |" in run.stdout  # one table row per figure
    # the static path on every mode gives the eager path's greedy tokens; the three memory
    # attention paths give the same logits
    for mode in ("none", "memory", "rag"):
        assert figures[f"{mode}, static, eager"]["rows_equal_to_eager"] == 1.0
        assert finite(figures[f"{mode}: static / eager speed"]["value"])
    for name in FORWARD[1:]:
        assert named(name)["max_logit_diff"] < 1e-4
    assert "CUDA graphs: not measurable on cpu" in run.stdout
    assert "peak device memory: not measurable on cpu" in run.stdout
    goals = data["goals"]
    assert len(goals) == 5 and all(finite(g["value"]) and finite(g["target"]) for g in goals)
    for g in goals:
        assert f"| {g['goal']} |" in run.stdout
