"""`m3 encode` as a user runs it, now against the encode code of an earlier revision, same bank.

    .venv/bin/python bench/encode_command.py --bank /tmp/enc-template --before 985f206 [--repeats 1]

--bank: a demo bank with `refs` and a trained model but no `memories` (each run encodes a fresh
copy of it, so every reference is computed). --before REV: the files of the encode path
(FILES) are taken from REV into a copy of the committed tree (HEAD), put first on PYTHONPATH for
the command and every Ray worker it starts; "now" is an unchanged copy of HEAD, run the same way. Runs alternate
(before, now, now, before, ...). Per run: wall seconds, the seconds the stage reports for its
own work, and CPU seconds of the whole process tree (driver, Ray's GCS and raylet, workers,
actors; bench/encode.py's CPUMeter), the figure other jobs on a shared box move least.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.encode import CPUMeter  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
FILES = (
    "model/memory.py",
    "model/transformer.py",
    "model/ref_batches.py",
    "pipelines/encode_step.py",
    "jobs/stages/encode.py",
)


def tree_at(rev: str | None, dst: Path) -> None:
    """The committed tree (HEAD) with FILES as they were at rev (None: as at HEAD)."""
    dst.mkdir()
    archive = subprocess.run(["git", "archive", "HEAD"], cwd=ROOT, check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(dst)], input=archive, check=True)
    for f in FILES if rev else ():
        src = subprocess.run(["git", "show", f"{rev}:{f}"], cwd=ROOT, check=True, capture_output=True).stdout
        (dst / f).write_bytes(src)


def run(bank: Path, work: Path, pythonpath: str) -> dict:
    copy = work / "bank"
    shutil.rmtree(copy, ignore_errors=True)
    shutil.copytree(bank, copy)
    # the tree is also the command's working directory: Ray puts the driver's on its workers'
    # sys.path ahead of PYTHONPATH, so from ROOT every actor would run the current files
    env = {**os.environ, "PYTHONPATH": pythonpath}
    with CPUMeter() as cpu:
        t0 = time.perf_counter()
        out = subprocess.run(
            [str(ROOT / ".venv/bin/m3"), "encode", "-c", str(ROOT / "configs/demo.yaml"), "--set", f"bank.uri={copy}"],
            cwd=pythonpath,
            env=env,
            capture_output=True,
            text=True,
        )
        wall = time.perf_counter() - t0
    if out.returncode:
        raise SystemExit(out.stdout[-2000:] + out.stderr[-2000:])
    stage = re.search(r"memories version \d+ in ([\d.]+) s", out.stdout)
    shutil.rmtree(copy, ignore_errors=True)
    return {
        "wall": wall,
        "cpu": cpu.seconds,
        "stage": float(stage.group(1)) if stage else float("nan"),
        "load": os.getloadavg()[0],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--bank", required=True)
    ap.add_argument("--before", required=True, help="git revision of the encode path to compare with")
    ap.add_argument("--repeats", type=int, default=1)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="m3-bench-encode-command-"))
    tree_at(args.before, work / "before")
    tree_at(None, work / "now")  # both from HEAD's files, so only FILES differ (not uncommitted work)
    res: dict = {"before": [], "now": []}
    order = [("before", str(work / "before")), ("now", str(work / "now"))]
    for r in range(args.repeats):
        for name, path in order if r % 2 == 0 else order[::-1]:
            res[name].append(run(Path(args.bank), work, path))
            x = res[name][-1]
            print(
                f"{name}: wall {x['wall']:.1f} s, stage {x['stage']:.1f} s, CPU {x['cpu']:.1f} s, load {x['load']:.1f}",
                file=sys.stderr,
                flush=True,
            )
    med = {n: {k: statistics.median(x[k] for x in v) for k in ("wall", "stage", "cpu")} for n, v in res.items()}
    print(
        f"\n`m3 encode -c configs/demo.yaml` on {args.bank}, encode path at {args.before} vs now, "
        f"median of {args.repeats}\n"
    )
    print("| version | wall (s) | stage (s) | CPU, process tree (s) |\n|---|---:|---:|---:|")
    for n in ("before", "now"):
        print(f"| {n} | {med[n]['wall']:.1f} | {med[n]['stage']:.1f} | {med[n]['cpu']:.1f} |")
    print(
        f"| now / before | {med['now']['wall'] / med['before']['wall']:.2f} | "
        f"{med['now']['stage'] / med['before']['stage']:.2f} | {med['now']['cpu'] / med['before']['cpu']:.2f} |"
    )
    print(f"\nLoad average at the end: {' / '.join(f'{x:.1f}' for x in os.getloadavg())} on {os.cpu_count()} cores.")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
