"""Whole commands against their stage-only time: what a user waits for (`m3 ingest`, `m3 embed`,
`m3 encode`, or the whole `m3 run`) next to the seconds the stage itself reports, in one run.

    .venv/bin/python bench/commands.py [--records 0] [--commands ingest,embed,encode] [--run]

Each command runs as the user runs it: a new `m3` process (Python start-up, imports, its own
embedded Ray) on a fresh bank of the first --records FOLDOC entries (0 = all 12,383) with
configs/demo.yaml. Measured per command:

- wall: seconds from spawn to exit;
- CPU: user + system seconds of the whole process tree (the driver, Ray's GCS, raylet and every
  worker), sampled with psutil every 0.1 s and summed over every process seen (a process's last
  sample, so a process that lives under 0.1 s or its last 0.1 s can be missed: a lower bound;
  each process's own seconds: its children_* would count its reaped children twice);
- stage-only (the baseline): the seconds the command reports for its own work: ingest, the sum
  of its report's stage_seconds (clean, dedup, tokenize, chunk, commit); embed and encode, the
  runner's "in X s" (actor pool start to commit) and the pure compute at its printed rate.

Printed: a markdown table and, per command, whole / stage-only. With --run, `m3 run` (every stage,
training included) is measured the same way, its stage-only figure the sum of run.json's stages.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
M3 = ROOT / ".venv" / "bin" / "m3"

sys.path.insert(0, str(ROOT))
from bench.rebuild import records, write  # noqa: E402 - the same FOLDOC corpus helpers

RATE = re.compile(r"in ([\d.]+) s \(([\d,.]+) refs/s\)")
COMPUTED = re.compile(r"([\d,]+) computed")


def measure(argv: list[str], cwd: Path) -> tuple[float, float, str]:
    """(wall s, CPU s of the process tree, stdout) of one command."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(argv, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    root = psutil.Process(proc.pid)
    cpu: dict[tuple[int, float], float] = {}  # (pid, create time) -> last user + system seen

    def sample() -> None:
        try:
            procs = [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return
        for p in procs:
            try:
                t = p.cpu_times()
                # its own time only: a parent's children_* repeat the reaped children sampled here
                cpu[(p.pid, p.create_time())] = t.user + t.system
            except psutil.NoSuchProcess:
                pass

    out: list[str] = []
    reader = threading.Thread(target=lambda: out.extend(proc.stdout), daemon=True)
    reader.start()
    while proc.poll() is None:
        sample()
        time.sleep(0.1)
    wall = time.perf_counter() - t0
    reader.join()
    text = "".join(out)
    if proc.returncode:
        sys.exit(f"{' '.join(argv)} failed ({proc.returncode}):\n{text[-3000:]}")
    return wall, sum(cpu.values()), text


def stage_only(command: str, text: str, bank: Path) -> tuple[float, float | None]:
    """(the stage's own seconds, its pure compute seconds where printed)."""
    if command == "ingest":
        report = max((bank / "_reports").glob("ingest-*.json"), key=lambda p: p.stat().st_mtime)
        return sum(json.loads(report.read_text())["stage_seconds"].values()), None
    if command == "run":
        return sum(json.loads((bank / "_reports" / "run.json").read_text())["seconds"].values()), None
    line = [ln for ln in text.splitlines() if f"{command}:" in ln and RATE.search(ln)][-1]
    seconds, rate = RATE.search(line).groups()
    computed = int(COMPUTED.search(line).group(1).replace(",", ""))
    return float(seconds), computed / float(rate.replace(",", ""))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--records", type=int, default=0, help="first N FOLDOC entries (0 = all)")
    ap.add_argument("--commands", default="ingest,embed,encode")
    ap.add_argument("--config", default="configs/demo.yaml")
    ap.add_argument("--run", action="store_true", help="also `m3 run` on a bank of its own")
    ap.add_argument("--dir", default=None, help="work directory (default: a temporary one)")
    a = ap.parse_args()

    work = Path(a.dir or tempfile.mkdtemp(prefix="m3-commands-"))
    work.mkdir(parents=True, exist_ok=True)
    src = work / "corpus.jsonl.gz"
    write(src, records(a.records))
    rows = []
    jobs = [(c, work / "bank") for c in a.commands.split(",") if c] + ([("run", work / "run-bank")] if a.run else [])
    for command, bank in jobs:
        argv = [
            str(M3),
            command,
            "-c",
            str(ROOT / a.config),
            "--set",
            f"bank.uri={bank}",
            "--set",
            f"corpus.paths=[{src}]",
        ]
        wall, cpu, text = measure(argv, ROOT)
        stage, compute = stage_only(command, text, bank)
        rows.append((command, wall, cpu, stage, compute))
        print(f"{command}: {wall:.1f} s wall, {cpu:.1f} s CPU, stage-only {stage:.1f} s", flush=True)

    print(f"\n{a.records or 'all'} FOLDOC entries, {a.config}, {psutil.cpu_count()} cores\n")
    print("| command | wall (s) | CPU (s) | CPU / wall | stage-only (s) | compute (s) | whole / stage-only |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for command, wall, cpu, stage, compute in rows:
        comp = f"{compute:.1f}" if compute is not None else "–"
        print(
            f"| `m3 {command}` | {wall:.1f} | {cpu:.1f} | {cpu / wall:.2f} | {stage:.1f} | {comp} | {wall / stage:.2f}x |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
