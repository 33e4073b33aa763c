"""`m3 ingest` against DataTrove end to end: both whole pipelines as a user runs them, each in a
new process, on the same FOLDOC file with the same number of CPUs, interleaved.

    .venv/bin/pip install -e ".[bench]"      # datatrove and the packages its stages import
    .venv/bin/python bench/ingest_end_to_end.py [--cpus 2] [--repeats 3] [--no-floors]

- DataTrove: `python bench/ingest_datatrove.py FILE --workers CPUS`, a new Python process: its
  imports, its LocalPipelineExecutor's process pools (one per stage), Gopher quality +
  repetition filters and its four MinHash stages, the untimed-in-its-report input split;
- ours: `m3 ingest -c configs/demo.yaml --set bank.uri=<new bank> --set corpus.paths=[FILE]
  --set ray.num_cpus=CPUS`, a new process: Python, imports, its embedded Ray, clean, dedup, the
  tokenizer's training, chunking and the four table commits (work DataTrove's pipeline does not
  do, so the ratio is conservative).

Both read the same uncompressed JSONL (all 12,383 entries). Each repeat runs the two in turn, the
order alternating, so a change of machine load falls on both. Printed: wall and CPU seconds (the
whole process tree's, bench/commands.py's sampler) per run, their medians, DataTrove / ours.

Floors (unless --no-floors), each in a new process, interleaved with the rest: `python -c pass`;
the import of `m3 ingest`'s code; that import plus starting the embedded Ray the way ingest
starts it, one task on each CPU, and stopping it: what no ingest of any corpus can go under.

--attached: also `m3 ingest` joined to a Ray cluster that is already running (`--set
ray.address=...`; one head of CPUS CPUs started here with `ray start --head`, on loopback, before
the runs, stopped after them), the way a user who runs many commands keeps one: no Ray start or
stop in the command, and the cluster's idle workers (imports done) are reused from the second run
on. Its CPU column counts the command's own process tree only (the workers are the cluster's);
compare walls.

--timeline: instead, one `m3 ingest` (the same command, run through jobs.cli.main in a new
process) with the wall and driver-CPU seconds at each phase: imports, plan, Ray's start, each
stage, the commit, Ray's stop at exit.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from contextlib import contextmanager, nullcontext
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench.commands import measure  # noqa: E402 - the process-tree wall and CPU sampler
from bench.ingest import write_corpus  # noqa: E402 - the uncompressed FOLDOC file bench/ingest.py uses
from jobs.runtime import free_port  # noqa: E402

PY = ROOT / ".venv" / "bin" / "python"
M3 = ROOT / ".venv" / "bin" / "m3"

RAY_FLOOR = """
from jobs.config import RayConfig
from jobs.runtime import init_ray
import jobs.stages.ingest  # noqa: F401 - the command's imports
ray = init_ray(RayConfig(num_cpus={cpus}), dashboard=False)
f = ray.remote(num_cpus=1)(lambda: 0)
ray.get([f.remote() for _ in range({cpus})])
ray.shutdown()
"""


TIMELINE = """
import resource, sys, time
T0 = time.perf_counter()
def mark(what):
    r = resource.getrusage(resource.RUSAGE_SELF)
    print(f"@ {time.perf_counter() - T0:6.2f} s wall {r.ru_utime + r.ru_stime:5.2f} s driver CPU  {what}", flush=True)
from jobs.cli.main import main
mark("import jobs.cli.main")
import jobs.stages.ingest as ing
mark("import jobs.stages.ingest")
def timed(name, fn, label=None):
    def wrapped(*a, **k):
        mark(f"{label or name(a)} start")
        out = fn(*a, **k)
        mark(f"{label or name(a)} done")
        return out
    return wrapped
ing.plan = timed(None, ing.plan, "plan")
ing.init_ray = timed(None, ing.init_ray, "ray.init")
ing.run_tasks = timed(lambda a: a[0], ing.run_tasks)
ing.tokenizer_for = timed(None, ing.tokenizer_for, "tokenize")
ing.commit = timed(None, ing.commit, "commit")
main(sys.argv[1:])
import ray
ray.shutdown()
mark("Ray stop (at exit in m3)")
"""


def driver_env(work: Path) -> dict[str, str]:
    """What a process needs to join running_ray's head: loopback (single-machine mode) and its token."""
    return {
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN_PATH": str(work / "auth_token"),
    }


@contextmanager
def running_ray(cpus: int, work: Path):
    """The address of a Ray head with `cpus` CPUs on loopback, in a process group of its own,
    ready when this yields; stopped (its group killed) after."""
    port = free_port()
    token = work / "auth_token"  # a head finding a token (~/.ray/auth_token) requires one: give ours
    token.write_text(uuid.uuid4().hex)
    env = {**os.environ, **driver_env(work)}
    temp = Path(tempfile.mkdtemp(prefix="m3ray-", dir="/tmp"))  # short: socket paths
    proc = subprocess.Popen(
        [
            str(ROOT / ".venv" / "bin" / "ray"),
            "start",
            "--head",
            "--block",
            "--node-ip-address=127.0.0.1",
            f"--port={port}",
            f"--num-cpus={cpus}",
            "--include-dashboard=false",
            f"--temp-dir={temp}",
            "--disable-usage-stats",
        ],
        env=env,
        start_new_session=True,
        stdout=open(work / "ray-head.log", "w"),
        stderr=subprocess.STDOUT,
    )
    address = f"127.0.0.1:{port}"
    try:
        probe = f"import ray; ray.init(address={address!r}); ray.shutdown()"
        for _ in range(120):
            if proc.poll() is not None:
                raise RuntimeError(f"ray start exited: {(work / 'ray-head.log').read_text()[-2000:]}")
            try:
                if subprocess.run([str(PY), "-c", probe], env=env, capture_output=True, timeout=60).returncode == 0:
                    break
            except subprocess.TimeoutExpired:
                pass
            time.sleep(1)
        else:
            raise RuntimeError(f"no Ray at {address} within 120 s")
        yield address
    finally:
        os.killpg(proc.pid, signal.SIGTERM)  # --block: ray start stops the node it started
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            pass
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # whatever of the group is left
        except ProcessLookupError:
            pass
        shutil.rmtree(temp, ignore_errors=True)


def commands(
    corpus: Path, work: Path, cpus: int, run: int, floors: bool, address: str | None = None
) -> dict[str, list[str]]:
    out = {
        "datatrove": [
            str(PY),
            str(ROOT / "bench" / "ingest_datatrove.py"),
            str(corpus),
            "--workers",
            str(cpus),
            "--workdir",
            str(work / f"dt-{run}"),
        ],
        "m3 ingest": [
            str(M3),
            "ingest",
            "-c",
            str(ROOT / "configs" / "demo.yaml"),
            "--set",
            f"bank.uri={work / f'bank-{run}'}",
            "--set",
            f"corpus.paths=[{corpus}]",
            "--set",
            f"ray.num_cpus={cpus}",
        ],
    }
    if address:
        out["m3 ingest, joined to a running Ray"] = [
            "env",
            *(f"{k}={v}" for k, v in driver_env(work).items()),
            str(M3),
            "ingest",
            "-c",
            str(ROOT / "configs" / "demo.yaml"),
            "--set",
            f"bank.uri={work / f'bank-joined-{run}'}",
            "--set",
            f"corpus.paths=[{corpus}]",
            "--set",
            f"ray.address={address}",
        ]
    if floors:
        out["floor: python -c pass"] = [str(PY), "-c", "pass"]
        out["floor: + ingest's imports"] = [str(PY), "-c", "import jobs.cli.main, jobs.stages.ingest"]
        out["floor: + Ray start, 1 task per CPU, stop"] = [str(PY), "-c", RAY_FLOOR.format(cpus=cpus)]
    return out


def run_all(corpus: Path, work: Path, a, address: str | None) -> dict[str, list[tuple[float, float]]]:
    """Every command --repeats times, the order reversed on odd repeats: name -> [(wall, CPU)]."""
    runs: dict[str, list[tuple[float, float]]] = {}
    for r in range(a.repeats):
        cmds = list(commands(corpus, work, a.cpus, r, not a.no_floors, address).items())
        if r % 2:
            cmds.reverse()
        for name, argv in cmds:
            wall, cpu, out = measure(argv, ROOT)
            bank = next((x.split("=", 1)[1] for x in argv if x.startswith("bank.uri=")), None)
            if bank and not (Path(bank) / "refs.lance").exists():
                raise RuntimeError(f"{name} wrote no refs table: {out[-3000:]}")
            runs.setdefault(name, []).append((wall, cpu))
            print(f"run {r + 1}: {name}: {wall:.2f} s wall, {cpu:.2f} s CPU", flush=True)
    return runs


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cpus", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-floors", action="store_true")
    ap.add_argument("--dir", default=None, help="work directory (default: a temporary one)")
    ap.add_argument("--attached", action="store_true", help="also m3 ingest joined to a running Ray (docstring)")
    ap.add_argument("--timeline", action="store_true", help="one m3 ingest, its phases timed")
    a = ap.parse_args()

    work = Path(a.dir or tempfile.mkdtemp(prefix="m3-e2e-"))
    work.mkdir(parents=True, exist_ok=True)
    corpus = work / "foldoc.jsonl"
    size = write_corpus(corpus, 1)
    print(f"load average at start: {os.getloadavg()}", flush=True)
    if a.timeline:
        argv = commands(corpus, work, a.cpus, 0, False)["m3 ingest"]
        wall, cpu, text = measure([str(PY), "-c", TIMELINE, *argv[1:]], ROOT)
        print("".join(line + "\n" for line in text.splitlines() if line.startswith("@")), end="")
        print(f"whole process: {wall:.2f} s wall, {cpu:.2f} s CPU (process tree); load average {os.getloadavg()}")
        return 0
    with running_ray(a.cpus, work) if a.attached else nullcontext() as address:
        runs = run_all(corpus, work, a, address)
    load = os.getloadavg()

    med = {name: (statistics.median(w for w, _ in v), statistics.median(c for _, c in v)) for name, v in runs.items()}
    print(
        f"\nFOLDOC, {size / 1e6:.2f} MB of JSONL, {a.cpus} CPUs, median of {a.repeats}, "
        f"load average at end {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}\n"
    )
    print("| run | wall (s) | CPU (s) | walls | DataTrove / this (wall) |")
    print("|---|---:|---:|---|---:|")
    dt = med["datatrove"][0]
    for name, (wall, cpu) in med.items():
        walls = ", ".join(f"{w:.1f}" for w, _ in runs[name])
        print(f"| {name} | {wall:.2f} | {cpu:.2f} | {walls} | {dt / wall:.2f}x |")
    pairs = [d[0] / m[0] for d, m in zip(runs["datatrove"], runs["m3 ingest"])]
    print(
        f"\nDataTrove / m3 ingest, end to end: {dt / med['m3 ingest'][0]:.2f}x (medians); "
        f"per repeat {', '.join(f'{p:.2f}x' for p in pairs)}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
