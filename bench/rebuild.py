"""Incremental rebuild after changing 1 % of the corpus, against a full rebuild, same process.

    .venv/bin/python bench/rebuild.py [--records 0] [--changed 0.01] [--no-embeddings]

The demo config (configs/demo.yaml: model `small`, int8 codec, its retriever's embeddings) on FOLDOC
(--records N: the first N entries; 0 = all 12,383). In one process, one embedded Ray (started
before any clock runs):

0. warm-up:     an untimed rebuild of 200 entries into another bank (Ray's workers start);
1. full:        `run_rebuild` into an empty bank: ingest, encode and embed everything, publish;
2. incremental: the text of --changed of the entries edited (every 1/changed-th entry gets a
                sentence appended), then `run_rebuild` on that bank: re-ingest (the corpus is
                re-read, but only the edited records are normalized, filtered, MinHashed,
                tokenized and cut: the rest come from the per-record memo the full build left
                in the bank, pipelines/memo.py), encode and embed only the references whose
                content hash changed, copy the rest, publish, retain.

Printed: wall seconds of each step of both runs (lock, ingest, memories, embeddings, publish +
retention) and of ingest's own stages, the records ingest took from its memo, the same
incremental ingest without the memo (into a copy of the full build's ingest tables, after the
rebuild), and the ratio incremental / full, overall (ingest included: the figure issue 14 asks
for) and without ingest. bench/ingest_memo.py measures the memo's effect in CPU seconds.
"""

from __future__ import annotations

import argparse
import gzip
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

ROOT = Path(__file__).resolve().parents[1]
FOLDOC = ROOT / "data" / "foldoc" / "foldoc.jsonl.gz"
STEPS = ("lock", "ingest", "memories", "embeddings", "publish")


def records(n: int) -> list[dict]:
    with gzip.open(FOLDOC, "rt", encoding="utf-8") as f:
        out = [json.loads(line) for line in f]
    return out[:n] if n else out


def write(path: Path, recs: list[dict]) -> None:
    with gzip.open(path, "wt", encoding="utf-8") as f:
        for r in recs:
            f.write(json.dumps(r) + "\n")


def ingest_seconds(cfg) -> float:
    """Wall seconds of the ingest step of a rebuild (tokenizer pinned as `m3 rebuild` does)."""
    from jobs.ops.rebuild import pin_tokenizer
    from jobs.stages.ingest import run_ingest

    cfg = pin_tokenizer(cfg)
    t = time.perf_counter()
    run_ingest(cfg)
    return time.perf_counter() - t


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--records", type=int, default=0, help="first N FOLDOC entries (0 = all)")
    ap.add_argument("--changed", type=float, default=0.01, help="fraction of entries edited")
    ap.add_argument("--no-embeddings", action="store_true", help="memories only (rebuild.embeddings=false)")
    ap.add_argument("--dir", default=None, help="work directory (default: a temporary one)")
    a = ap.parse_args()

    from jobs.config import load_config
    from jobs.ops.rebuild import run_rebuild
    from jobs.runtime import init_ray

    work = Path(a.dir or tempfile.mkdtemp(prefix="m3-bench-rebuild-"))
    work.mkdir(parents=True, exist_ok=True)
    corpus, bank = work / "corpus.jsonl.gz", work / "bank"
    recs = records(a.records)
    write(corpus, recs)
    overrides = [
        f"corpus.paths=[{corpus}]",
        f"bank.uri={bank}",
        f"rebuild.embeddings={'false' if a.no_embeddings else 'true'}",
    ]
    cfg = load_config(ROOT / "configs" / "demo.yaml", overrides)
    init_ray(cfg.ray)  # Ray's start-up is not part of either run
    # warm-up, untimed: a rebuild of 200 entries into another bank starts Ray's worker processes
    # and their imports, so that cost does not land in the first timed run only
    write(work / "warm.jsonl.gz", recs[:200])
    run_rebuild(
        load_config(
            ROOT / "configs" / "demo.yaml",
            [f"corpus.paths=[{work / 'warm.jsonl.gz'}]", f"bank.uri={work / 'warm-bank'}", *overrides[2:]],
        )
    )

    t = time.perf_counter()
    full = run_rebuild(cfg)
    full_s = time.perf_counter() - t

    every = max(1, round(1 / a.changed))
    edited = [
        dict(r, text=r["text"] + " This entry was revised for the rebuild benchmark.") if i % every == 0 else r
        for i, r in enumerate(recs)
    ]
    write(corpus, edited)
    # the full build's ingest tables without the memo, for the same incremental ingest as before
    # issue 14 (everything re-cleaned and re-cut), timed after the rebuild
    nomemo = work / "bank-nomemo"
    shutil.copytree(bank, nomemo, ignore=shutil.ignore_patterns("_memo", "memories.lance", "embeddings.lance"))
    t = time.perf_counter()
    incr = run_rebuild(load_config(ROOT / "configs" / "demo.yaml", overrides))
    incr_s = time.perf_counter() - t
    nomemo_s = ingest_seconds(load_config(ROOT / "configs" / "demo.yaml", [overrides[0], f"bank.uri={nomemo}"]))

    mem = incr["memories"]
    reports = sorted((bank / "_reports").glob("ingest-*.json"), key=lambda p: p.stat().st_mtime)
    full_ingest, hits = (json.loads(p.read_text()) for p in (reports[0], reports[-1]))
    n_refs = mem["added"] + mem["changed"] + mem["unchanged"]
    print(
        f"\n## Incremental rebuild vs full rebuild ({len(recs):,} FOLDOC entries, {sum(i % every == 0 for i in range(len(recs)))} "
        f"edited = {a.changed:.0%}; {n_refs:,} references; model small, int8"
        f"{'' if a.no_embeddings else f', {cfg.retrieval.embedder} embeddings'}; 2 CPUs, embedded Ray)\n"
    )
    print(
        f"references re-encoded: {mem['added'] + mem['changed']:,} (added {mem['added']}, changed {mem['changed']}), "
        f"removed {mem['removed']}, copied {mem['unchanged']:,}"
    )
    print(
        f"incremental ingest: {hits.get('memo_clean_hits', 0):,} of {hits.get('records_read', 0):,} records "
        f"cleaned and {hits.get('memo_chunk_hits', 0):,} documents cut from the memo\n"
    )
    print("| step | full (s) | incremental (s) |")
    print("|---|---:|---:|")
    for step in STEPS:
        print(f"| {step} | {full['timings'].get(step, 0):.1f} | {incr['timings'].get(step, 0):.1f} |")
    print(f"| **total** | **{full_s:.1f}** | **{incr_s:.1f}** |")
    print("\n| ingest stage | full (s) | incremental (s) |")
    print("|---|---:|---:|")
    for stage, seconds in full_ingest["stage_seconds"].items():
        print(f"| {stage} | {seconds:.1f} | {hits['stage_seconds'].get(stage, 0):.1f} |")
    no_ingest = lambda s: sum(v for k, v in s["timings"].items() if k != "ingest")  # noqa: E731
    print(
        f"\nthe same incremental ingest without the memo: {nomemo_s:.1f} s "
        f"(with it: {incr['timings'].get('ingest', 0):.1f} s)"
    )
    print(
        f"\nratio incremental / full: {incr_s / full_s:.1%} overall; "
        f"{no_ingest(incr) / max(no_ingest(full), 1e-9):.1%} without ingest (encode + embed + publish)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
