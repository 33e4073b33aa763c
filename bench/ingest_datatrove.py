"""The DataTrove half of the ingest benchmark: Gopher quality + repetition filters, then
MinHash-LSH dedup (5-gram shingles, 14 buckets x 8 hashes), run with DataTrove's own
LocalPipelineExecutor on the same JSONL input and the same number of CPU workers.

Requirements (beyond the project): `datatrove` plus four packages its stages import
lazily without declaring them as core dependencies (checked with datatrove 0.10.1):
    datatrove>=0.10,<0.11  regex  orjson  spacy>=3.8  xxhash<4
`regex` is imported by datatrove.utils.text (every filter), `orjson` by JsonlReader/Writer,
`spacy` is DataTrove's English word tokenizer (`spacy.blank("en")`: rule-based, inside the
wheel, nothing downloaded at run time; no NLTK data is needed), and MinHash's default
xxhash hashing passes `str`, which xxhash 4 refuses ("Strings must be encoded before
hashing"); DataTrove's own `processing` extra pins `xxhash<4`. The default English setting
is kept on purpose: it is what a DataTrove user gets, and spaCy tokenization is where
DataTrove spends its time.

Pipeline, as in DataTrove's own minhash example (each stage is one executor run; all
stages are inside the timed region):
  1. JsonlReader -> GopherQualityFilter -> GopherRepetitionFilter -> JsonlWriter  (tasks=workers)
  2. JsonlReader(filtered) -> MinhashDedupSignature                              (tasks=workers)
  3. MinhashDedupBuckets                                      (tasks=14, one per bucket)
  4. MinhashDedupCluster                                      (tasks=1, DataTrove's design)
  5. JsonlReader(filtered) -> MinhashDedupFilter -> JsonlWriter                  (tasks=workers)
DataTrove's readers parallelize over files, not within one, so the input is first split
into `workers` shards, round-robin by line (not timed: a file copy, reported separately).
Writers are uncompressed so DataTrove pays no gzip cost the other side does not.
"""

from __future__ import annotations

import argparse
import glob
import gzip
import json
import os
import shutil
import sys
import tempfile
import time

__all__ = ["run_datatrove"]


def _shard(input_path: str, out_dir: str, shards: int) -> tuple[int, int]:
    """Split a JSONL file (plain or .gz) into `shards` plain files round-robin; return
    (records, uncompressed bytes of those records)."""
    os.makedirs(out_dir, exist_ok=True)
    outs = [open(os.path.join(out_dir, f"part-{i:05d}.jsonl"), "wb") for i in range(shards)]
    records = n_bytes = 0
    opener = gzip.open if input_path.endswith(".gz") else open
    try:
        with opener(input_path, "rb") as f:
            for line in f:
                if not line.strip():
                    continue
                n_bytes += len(line)
                if not line.endswith(b"\n"):
                    line += b"\n"
                outs[records % shards].write(line)
                records += 1
    finally:
        for o in outs:
            o.close()
    return records, n_bytes


def _count_lines(folder: str) -> int:
    return sum(
        sum(1 for line in open(p, "rb") if line.strip())
        for p in glob.glob(os.path.join(folder, "**", "*.jsonl"), recursive=True)
    )


def run_datatrove(input_jsonl_path: str, workdir: str, workers: int = 2, *, quality_filters: bool = True) -> dict:
    """Run DataTrove's filter + MinHash dedup pipeline on `input_jsonl_path` (records with
    "text" and "id"), everything under a fresh directory inside `workdir`.

    quality_filters=False skips stage 1 and deduplicates every input record: DataTrove's
    Gopher filter counts spaCy's punctuation tokens as words, so on brace-heavy text such as
    FOLDOC it drops most documents for "below_alpha_threshold" and its MinHash stages then
    see far fewer documents than ours do; this measures its MinHash on the full input.

    Returns {"seconds": wall time of all stages, "stage_seconds": {stage: seconds},
    "docs_in": records read, "docs_filtered": records after the Gopher filters,
    "docs_out": records kept, "bytes": uncompressed input bytes, "shard_seconds": the untimed
    input split, "workdir": the run directory (kept for inspection)}.
    """
    # Imported here so the rest of the project never needs DataTrove installed.
    from datatrove.executor import LocalPipelineExecutor
    from datatrove.pipeline.dedup import (
        MinhashDedupBuckets,
        MinhashDedupCluster,
        MinhashDedupFilter,
        MinhashDedupSignature,
    )
    from datatrove.pipeline.dedup.minhash import MinhashConfig
    from datatrove.pipeline.filters import GopherQualityFilter, GopherRepetitionFilter
    from datatrove.pipeline.readers import JsonlReader
    from datatrove.pipeline.writers import JsonlWriter
    from datatrove.utils.hashing import HashConfig

    if not os.path.isfile(input_jsonl_path):
        raise FileNotFoundError(f"input JSONL not found: {input_jsonl_path}")
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    os.makedirs(workdir, exist_ok=True)
    run = tempfile.mkdtemp(prefix="datatrove-", dir=workdir)  # fresh: DataTrove skips completed tasks
    d = {k: os.path.join(run, k) for k in ("input", "filtered", "sigs", "buckets", "remove_ids", "output", "logs")}

    t0 = time.perf_counter()
    docs_in, n_bytes = _shard(input_jsonl_path, d["input"], workers)
    shard_seconds = time.perf_counter() - t0

    # DataTrove's defaults (5-grams, 14 x 8, 64-bit xxhash) spelled out: they are the benchmark.
    minhash = MinhashConfig(
        n_grams=5, num_buckets=14, hashes_per_bucket=8, hash_config=HashConfig(precision=64, hash_fc="xxhash")
    )

    deduped = d["filtered"] if quality_filters else d["input"]

    def reader(folder: str) -> JsonlReader:
        return JsonlReader(folder, text_key="text", id_key="id", compression=None, doc_progress=False)

    def executor(pipeline: list, tasks: int, name: str) -> LocalPipelineExecutor:
        return LocalPipelineExecutor(
            pipeline=pipeline,
            tasks=tasks,
            workers=min(workers, tasks),
            logging_dir=os.path.join(d["logs"], name),
            skip_completed=False,
        )

    stages = {
        "filter": executor(
            [
                reader(d["input"]),
                GopherQualityFilter(),
                GopherRepetitionFilter(),
                JsonlWriter(d["filtered"], compression=None),
            ],
            workers,
            "1-filter",
        ),
        "signature": executor([reader(deduped), MinhashDedupSignature(d["sigs"], config=minhash)], workers, "2-sig"),
        "buckets": executor(
            [MinhashDedupBuckets(d["sigs"], d["buckets"], config=minhash)], minhash.num_buckets, "3-buckets"
        ),
        "cluster": executor([MinhashDedupCluster(d["buckets"], d["remove_ids"], config=minhash)], 1, "4-cluster"),
        "dedup_filter": executor(
            [
                reader(deduped),
                MinhashDedupFilter(d["remove_ids"]),
                JsonlWriter(d["output"], compression=None),
            ],
            workers,
            "5-dedup-filter",
        ),
    }
    if not quality_filters:
        del stages["filter"]
    stage_seconds = {}
    start = time.perf_counter()
    for name, stage in stages.items():
        t = time.perf_counter()
        stage.run()
        stage_seconds[name] = time.perf_counter() - t
    seconds = time.perf_counter() - start

    return {
        "seconds": seconds,
        "stage_seconds": stage_seconds,
        "docs_in": docs_in,
        "docs_filtered": _count_lines(d["filtered"]) if quality_filters else docs_in,
        "docs_out": _count_lines(d["output"]),
        "bytes": n_bytes,
        "shard_seconds": shard_seconds,
        "workdir": run,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("input_jsonl")
    p.add_argument("--workdir", default=None, help="default: a temporary directory, removed afterwards")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--no-quality-filters", action="store_true", help="MinHash dedup of every input record")
    args = p.parse_args(argv)
    workdir = args.workdir or tempfile.mkdtemp(prefix="m3-bench-")
    try:
        r = run_datatrove(args.input_jsonl, workdir, args.workers, quality_filters=not args.no_quality_filters)
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    r["mb_per_s"] = r["bytes"] / 1e6 / r["seconds"]
    r["docs_per_s"] = r["docs_in"] / r["seconds"]
    json.dump(r, sys.stdout, indent=2)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
