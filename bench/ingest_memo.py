"""The per-record work of an incremental ingest with the memo against without, in CPU seconds.

    .venv/bin/python bench/ingest_memo.py [--records 0] [--changed 0.01]

FOLDOC (--records N: the first N entries; 0 = all 12,383), the demo config, every shard in this
process (no Ray: `time.process_time` of one process is what the steps cost, whatever else the
machine runs, where wall seconds on a shared machine are mostly waiting for a core):

1. full:   clean (read, normalize, quality, MinHash) and chunk (tokenize, cut, pack) every shard,
           writing the memo, as the first build of a bank does;
2. edited: --changed of the entries get a sentence appended (as bench/rebuild.py), then clean and
           chunk every shard again, once from scratch and once with the memo of step 1.

Dedup and the tokenizer run once, untimed: they are the same whether or not a memo is used.
The staged outputs with and without the memo are compared row for row. Printed: CPU seconds
per step and the ratio with memo / without.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.rebuild import records, write  # noqa: E402 - the same FOLDOC corpus helpers

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--records", type=int, default=0, help="first N FOLDOC entries (0 = all)")
    ap.add_argument("--changed", type=float, default=0.01, help="fraction of entries edited")
    a = ap.parse_args()

    import pyarrow as pa

    from jobs.config import load_config
    from jobs.stages.ingest import plan
    from pipelines import assemble, memo
    from pipelines.chunk_step import chunk_shard
    from pipelines.clean_step import clean_shard
    from pipelines.dedup_step import dedup_partition, resolve
    from pipelines.tokenizer import train_bpe
    from storage.staging import read_table

    work = Path(tempfile.mkdtemp(prefix="m3-bench-memo-"))
    corpus, bank = work / "corpus.jsonl.gz", str(work / "bank")
    recs = records(a.records)
    cfg = load_config(ROOT / "configs" / "demo.yaml", [f"corpus.paths=[{corpus}]", f"bank.uri={bank}"])

    def run(name: str, src: str | None, dst: str | None, tok_json: str | None = None) -> dict:
        """Clean, dedup (untimed) and chunk every shard into <work>/<name>; CPU seconds of each."""
        files, _, _, _, shards = plan(cfg)
        out, ids = work / name, [s.shard_id for s in shards]
        t = time.process_time()
        hits = sum(
            clean_shard(
                s,
                files,
                cfg.corpus,
                cfg.quality,
                cfg.dedup,
                out,
                cfg.bank_quality,
                memo_src=src and f"{src}/clean",
                memo_dst=dst and f"{dst}/clean",
            )["memo_hits"]
            for s in shards
        )
        clean_s = time.process_time() - t
        for p in range(cfg.dedup.partitions):
            dedup_partition(p, out)
        dup_ranks = resolve(out, cfg.dedup.partitions)[0]
        if tok_json is None:
            tok_json = train_bpe(assemble.kept_texts(out, ids, dup_ranks), cfg.tokenizer.vocab_size).to_str()
        t = time.process_time()
        for s in ids:
            hits += chunk_shard(
                s,
                out,
                tok_json,
                dup_ranks,
                cfg.chunking,
                memo_src=src and f"{src}/chunk",
                memo_dst=dst and f"{dst}/chunk",
            )["memo_hits"]
        chunk_s = time.process_time() - t
        return {"clean": clean_s, "chunk": chunk_s, "hits": hits, "tok": tok_json, "out": out, "ids": ids}

    write(corpus, recs)
    full = run("full", None, memo.target(bank, "b1", "x").rsplit("/", 1)[0])
    memo.publish(bank, "b1", {"clean": "c", "chunk": "c"}, full["ids"])
    src = memo.source(bank, "clean", "c").rsplit("/", 1)[0]

    every = max(1, round(1 / a.changed))
    write(
        corpus,
        [
            dict(r, text=r["text"] + " This entry was revised for the rebuild benchmark.") if i % every == 0 else r
            for i, r in enumerate(recs)
        ],
    )
    scratch = run("scratch", None, None, full["tok"])
    incr = run("incremental", src, None, full["tok"])
    for kind in ("docs", "rejects", "refs", "seqs"):
        tables = [
            pa.concat_tables([read_table(p) for p in assemble.staged(r["out"], kind, r["ids"])])
            for r in (scratch, incr)
        ]
        assert tables[0].equals(tables[1]), f"{kind}: the memo changed the staged rows"

    n_edit = sum(i % every == 0 for i in range(len(recs)))
    print(
        f"\n## Ingest's per-record work with the memo ({len(recs):,} FOLDOC entries, {n_edit} edited; "
        f"CPU seconds in one process)\n"
    )
    print(
        f"records and documents taken from the memo: {incr['hits']:,}; staged outputs identical to "
        f"the build without it\n"
    )
    print("| step | full build (s) | edited, without memo (s) | edited, with memo (s) | with / without |")
    print("|---|---:|---:|---:|---:|")
    for step in ("clean", "chunk"):
        print(
            f"| {step} | {full[step]:.2f} | {scratch[step]:.2f} | {incr[step]:.2f} | {incr[step] / scratch[step]:.1%} |"
        )
    tot = {k: r["clean"] + r["chunk"] for k, r in (("full", full), ("scratch", scratch), ("incr", incr))}
    print(
        f"| **clean + chunk** | **{tot['full']:.2f}** | **{tot['scratch']:.2f}** | **{tot['incr']:.2f}** | "
        f"**{tot['incr'] / tot['scratch']:.1%}** |"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
