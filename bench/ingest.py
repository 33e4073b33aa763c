"""Filter + dedup throughput of our Ray pipeline against DataTrove on the same input and cores.

    .venv/bin/pip install -e ".[bench]"      # datatrove and the packages its stages import
    .venv/bin/python bench/ingest.py [--cpus 2] [--scale 1 3]

Ours: the ingest job's clean stage (read, normalize, every quality filter, exact key, MinHash
signatures and LSH band keys, per shard) and dedup stage (per hash partition, then the merge),
on an embedded Ray with --cpus CPUs. Ray's start-up is reported but not timed: it is paid once
per cluster, not per job. DataTrove: bench/ingest_datatrove.py, Gopher quality + repetition
filters and its four MinHash stages, LocalPipelineExecutor with the same number of workers.
Both read the same uncompressed JSONL. The ratio is ours / DataTrove in MB/s.

--scale N also runs ours on the corpus repeated N times (new ids, so every copy is a
duplicate to find) and reports throughput and the peak memory of the biggest worker process:
memory per worker should stay flat as the corpus grows, because a worker holds one shard.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

ROOT = Path(__file__).resolve().parents[1]
CORPUS = ROOT / "data" / "foldoc" / "foldoc.jsonl.gz"


def write_corpus(path: Path, copies: int) -> int:
    with gzip.open(CORPUS, "rt", encoding="utf-8") as f:
        records = [json.loads(line) for line in f]
    with open(path, "w", encoding="utf-8") as out:
        for c in range(copies):
            for r in records:
                out.write(json.dumps(dict(r, id=f"{r['id']}#{c}")) + "\n")
    return path.stat().st_size


class PeakRSS:
    """Samples the resident memory of every Ray worker process; keeps the largest seen."""

    def __init__(self):
        import psutil

        self.psutil, self.peak, self._stop = psutil, 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            for p in self.psutil.process_iter(["name", "cmdline", "memory_info"]):
                try:
                    cmd = " ".join(p.info["cmdline"] or [])
                    if "default_worker.py" in cmd or (p.info["name"] or "").startswith("ray::"):
                        self.peak = max(self.peak, p.info["memory_info"].rss)
                except (self.psutil.Error, TypeError):
                    continue
            time.sleep(0.1)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def run_ours(path: Path, bank: Path, cpus: int) -> dict:
    from jobs.config import load_config
    from jobs.stages.ingest import clean_and_dedup, plan
    from jobs.stages.report import Report
    from storage.bank import Bank

    cfg = load_config(
        ROOT / "configs" / "demo.yaml", [f"corpus.paths=[{path}]", f"bank.uri={bank}", f"ray.num_cpus={cpus}"]
    )
    report = Report("bench")
    t0 = time.perf_counter()
    files, counts, _, key, shards = plan(cfg)
    with PeakRSS() as rss:
        dups, _, _ = clean_and_dedup(cfg, Bank.of(cfg), files, shards, bank / "_staging" / key, report, key)
    seconds = time.perf_counter() - t0
    import pyarrow.parquet as pq

    staged = bank / "_staging" / key / "rejects"
    rejected = sum(pq.ParquetFile(f).metadata.num_rows for f in staged.glob("*.parquet")) + len(dups)
    return {
        "seconds": seconds,
        "records": sum(counts),
        "duplicates": len(dups),
        "rejected": rejected,
        "worker_peak_rss": rss.peak,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cpus", type=int, default=2)
    ap.add_argument("--scale", type=int, nargs="*", default=[1, 3])
    ap.add_argument("--skip-datatrove", action="store_true")
    args = ap.parse_args()
    os.environ.setdefault("M3_PROGRESS", "0")

    from jobs.config import RayConfig
    from jobs.runtime import init_ray, quiet_ray_data

    work = Path(tempfile.mkdtemp(prefix="m3-bench-ingest-"))
    path = work / "foldoc.jsonl"
    nbytes = write_corpus(path, 1)
    mb = nbytes / 2**20

    t0 = time.perf_counter()
    init_ray(RayConfig(num_cpus=args.cpus))
    quiet_ray_data()
    ray_start = time.perf_counter() - t0
    # The first run also pays for starting worker processes and importing numpy/pyarrow in
    # them: a cost per cluster, not per job, so it is run once untimed.
    warm = run_ours(path, work / "bank-warmup", args.cpus)
    ours = run_ours(path, work / "bank-1", args.cpus)

    print(f"\n## Ingest filter + dedup, FOLDOC ({mb:.2f} MB, {ours['records']:,} records), {args.cpus} CPUs\n")
    print("| pipeline | seconds | MB/s | records/s | ratio vs DataTrove |")
    print("|---|---|---|---|---|")
    row = lambda name, s, ratio: print(  # noqa: E731
        f"| {name} | {s:.2f} | {mb / s:.2f} | {ours['records'] / s:,.0f} | {ratio} |"
    )
    if not args.skip_datatrove:
        sys.path.insert(0, str(Path(__file__).parent))
        from ingest_datatrove import run_datatrove

        dt = run_datatrove(str(path), str(work / "datatrove"), workers=args.cpus)
        # Without its quality filters DataTrove's MinHash sees every document, as ours does.
        dt_all = run_datatrove(str(path), str(work / "datatrove-nofilter"), workers=args.cpus, quality_filters=False)
        row("DataTrove 0.10: Gopher quality + repetition, then MinHash (4 stages)", dt["seconds"], "1.00")
        row(
            "DataTrove 0.10: MinHash (4 stages) on every document",
            dt_all["seconds"],
            f"{dt['seconds'] / dt_all['seconds']:.2f}×",
        )
        row(
            "ours: clean as Ray tasks (all filters + MinHash keys) + partitioned dedup",
            ours["seconds"],
            f"**{dt['seconds'] / ours['seconds']:.2f}×**",
        )
        print(
            f"\nDataTrove stages (s): {dt['stage_seconds']}; it kept {dt['docs_out']:,} of {dt['docs_in']:,} "
            f"documents (its spaCy word split counts punctuation as words, so most FOLDOC entries fail its "
            f"alpha-word check); ours kept {ours['records'] - ours['rejected']:,}."
        )
    else:
        row("ours (clean as Ray tasks + partitioned dedup)", ours["seconds"], "n/a")
    print(f"Ray start-up (not timed above): {ray_start:.1f} s; first (cold-worker) run: {warm['seconds']:.2f} s.")

    print("\n### Scaling (ours): memory per worker stays flat\n")
    print("| corpus | MB | seconds | MB/s | duplicates found | peak worker RSS (MiB) |")
    print("|---|---|---|---|---|---|")
    for n in args.scale:
        p = work / f"foldoc-x{n}.jsonl"
        size = write_corpus(p, n) / 2**20
        r = run_ours(p, work / f"bank-x{n}", args.cpus)
        print(
            f"| FOLDOC ×{n} | {size:.1f} | {r['seconds']:.2f} | {size / r['seconds']:.2f} | "
            f"{r['duplicates']:,} | {r['worker_peak_rss'] / 2**20:.0f} |"
        )


if __name__ == "__main__":
    main()
