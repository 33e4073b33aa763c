"""Is the embed stage's ANN index the same for the same vectors, and what does making it so cost?

    .venv/bin/m3 run -c configs/demo.yaml --set bank.uri=/tmp/rep-a --only ingest,embed,pair
    .venv/bin/python bench/reproducible_index.py --bank /tmp/rep-a --repeats 3

Copies the bank's `embeddings` table into scratch banks (the bank itself is only read) and builds
its index there, interleaved: in this process (`storage.vectors.build_index`, LanceDB's parallel
HNSW insertion: the build before the fix) and in the one-Rayon-thread child the embed stage now
uses (`jobs.stages.embed.build_reproducible_index`). Each index answers the pair stage's own
queries (every 64-token chunk of the first pair.max_tokens of every training sequence, embedded
as `m3 pair` embeds them), top pair.k; "differ" counts queries whose top k differs from the first
build of the same kind. Then the same queries once through the index and once exact (LanceDB flat
scan), as `pair.exact` would: what exact pairing would cost instead. CPU seconds include child
processes; wall seconds depend on the machine's load (printed). Output: markdown on stdout.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from jobs.config import load_config  # noqa: E402
from jobs.stages.embed import build_reproducible_index  # noqa: E402
from pipelines.embedder import load_embedder  # noqa: E402
from pipelines.pair_step import split_chunks  # noqa: E402
from pipelines.tokenizer import load  # noqa: E402
from storage.bank import Bank  # noqa: E402
from storage.layout import BankLayout  # noqa: E402
from storage.vectors import build_index, search, search_params  # noqa: E402


def cpu() -> float:
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def pair_queries(bank: Bank, uri: str, cfg) -> np.ndarray:
    tok = load(str(BankLayout(uri).path(bank.metadata("refs")["tokenizer_path"])))
    seqs = bank.dataset("train_sequences").to_table(columns=["token_ids"]).column("token_ids").to_pylist()
    chunks = [c for s in seqs for c in split_chunks(s[: cfg.pair.max_tokens], cfg.pair.chunk_size)]
    spec = bank.metadata("embeddings")["config"]["retrieval"]["embedder"]
    return load_embedder(spec).embed(tok.decode_batch(chunks, skip_special_tokens=True), batch_size=64)


def answers(table, q: np.ndarray, k: int, exact: bool = False) -> list[list[str]]:
    params = search_params(table)
    return [
        [rid for rid, _ in hits]
        for lo in range(0, len(q), 256)
        for hits in search(table, q[lo : lo + 256], k=k, exact=exact, params=params)
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--bank", required=True)
    ap.add_argument("-c", "--config", default="configs/demo.yaml")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    cfg = load_config(args.config, [f"bank.uri={args.bank}"])
    bank = Bank(args.bank)
    data = bank.dataset("embeddings").to_table()
    q = pair_queries(bank, args.bank, cfg)
    r = cfg.retrieval
    print(
        f"{data.num_rows:,} vectors, {len(q):,} pair queries, top {cfg.pair.k}, {r.index_type}; "
        f"load average {os.getloadavg()[0]:.1f}\n"
    )
    scratch = Path(tempfile.mkdtemp(prefix="repidx-"))
    rows: dict[str, list] = {"in process (before)": [], "one-thread child (after)": []}
    try:
        for i in range(args.repeats):
            for kind in rows:
                uri = str(scratch / f"{i}-{len(rows[kind])}-{kind[:2]}")
                Bank(uri).db.create_table("embeddings", data)
                t0, c0 = time.perf_counter(), cpu()
                if kind.startswith("in"):
                    build_index(
                        Bank(uri).table("embeddings"), data.num_rows, r.index_threshold, index_type=r.index_type
                    )
                else:
                    build_reproducible_index(Bank(uri), "embeddings", data.num_rows, r.index_threshold, r.index_type)
                wall, c = time.perf_counter() - t0, cpu() - c0
                rows[kind].append((wall, c, answers(Bank(uri).table("embeddings"), q, cfg.pair.k)))
                if kind.startswith("one"):  # the last one is kept for the search timings
                    last = uri
                else:
                    shutil.rmtree(uri)
        print("| build | wall s (median) | CPU s (median) | queries whose top k differs from the first build |")
        print("|---|---|---|---|")
        base = float(np.median([c for _, c, _ in rows["in process (before)"]]))
        for kind, rs in rows.items():
            med_c = float(np.median([c for _, c, _ in rs]))
            print(
                f"| {kind} | {np.median([w for w, _, _ in rs]):.1f} | {med_c:.2f} ({med_c / base:.2f}x) | "
                f"{', '.join(str(sum(a != b for a, b in zip(rs[0][2], x[2]))) for x in rs[1:]) or '-'} |"
            )
        table = Bank(last).table("embeddings")
        print("\n| pair queries searched | wall s | CPU s |\n|---|---|---|")
        times = {}
        for exact in (False, True, False, True):  # interleaved, the second of each kept
            t0, c0 = time.perf_counter(), cpu()
            answers(table, q, cfg.pair.k, exact=exact)
            times[exact] = (time.perf_counter() - t0, cpu() - c0)
        for exact, (w, c) in times.items():
            ratio = f" ({c / times[False][1]:.2f}x)" if exact else ""
            print(f"| {'exact (flat scan)' if exact else 'ANN index'} | {w:.2f} | {c:.2f}{ratio} |")
        print(f"\nload average at the end {os.getloadavg()[0]:.1f}")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
