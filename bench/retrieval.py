"""Retrieval on a real bank: embedding throughput, ANN recall@5 against exact search, and query
latency of ANN vs exact, with ratios against the exact search measured in the same run.

    .venv/bin/m3 ingest -c configs/demo.yaml --set bank.uri=/tmp/emb-bank    # ~20 s, 11.4k refs
    .venv/bin/python bench/retrieval.py --bank /tmp/emb-bank

Reads the bank's `refs` table and never writes to the bank: the embeddings table is written to a
scratch LanceDB directory (--out, default a temp dir) through `Bank.write`, as the embed stage
would. Embedding runs `EmbedRefs` in this process (no Ray: its start-up is paid once per cluster
and would blur the model's rate), on every reference.

Queries: 200 references (fixed seed) perturbed the way a 64-token context chunk differs from the
reference it should retrieve: a window of 32 consecutive words with 20 % of the words dropped.
recall@5 is ANN vs exact search of the same query vectors (ties count: storage/vectors.py);
"source in top 5" is how often the reference a query came from is retrieved at all, a sanity check
of the embedder rather than of the index.

Latency: "single" = one query per call (p50/p95 over the 200 queries), "batched" = all 200 query
vectors in one call (total / 200). Exact search is LanceDB's flat scan (bypass_vector_index); the
numpy row is a brute-force matrix product over vectors already in RAM, the floor any exact search
could reach. Output: markdown on stdout.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipelines.embed_step import EMBEDDINGS_SCHEMA, INPUT_COLUMNS, EmbedRefs, to_arrow  # noqa: E402
from storage.bank import Bank  # noqa: E402
from storage.vectors import INDEX_TYPES, build_index, exact_topk, recall_at_k, search  # noqa: E402


def perturb(text: str, rng: np.random.Generator, window: int = 32, drop: float = 0.2) -> str:
    words = text.split()
    start = int(rng.integers(0, max(1, len(words) - window + 1)))
    words = words[start : start + window]
    kept = [w for w in words if rng.random() >= drop]
    return " ".join(kept or words)


def latencies(fn, queries: np.ndarray) -> dict:
    fn(queries[:1])  # warm caches (file handles, index pages) once, as a server would be
    single = []
    for i in range(len(queries)):
        t = time.perf_counter()
        fn(queries[i : i + 1])
        single.append(time.perf_counter() - t)
    t = time.perf_counter()
    fn(queries)
    batched = (time.perf_counter() - t) / len(queries)
    return {
        "p50": float(np.percentile(single, 50)) * 1e3,
        "p95": float(np.percentile(single, 95)) * 1e3,
        "batched": batched * 1e3,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--bank", default="bank/demo", help="bank directory with a refs table")
    ap.add_argument("--embedder", default="minilm")
    ap.add_argument("--out", default=None, help="scratch directory for the embeddings table")
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--k", type=int, default=5)
    ap.add_argument("--limit", type=int, default=None, help="embed only the first N refs")
    ap.add_argument("--batch", type=int, default=256, help="refs per EmbedRefs call (a Ray batch)")
    ap.add_argument("--cache", default=None, help="directory to keep/reuse the bank's vectors between runs")
    ap.add_argument("--sample", type=int, default=1000, help="refs embedded for throughput on a cache hit")
    args = ap.parse_args()

    refs = Bank(args.bank).dataset("refs").to_table(columns=INPUT_COLUMNS)
    if args.limit:
        refs = refs.slice(0, args.limit)
    n = refs.num_rows
    out_dir = args.out or tempfile.mkdtemp(prefix="m3-retrieval-")

    t = time.perf_counter()
    step = EmbedRefs(args.embedder)
    load_s = time.perf_counter() - t
    emb = step.embedder
    print(
        f"# Retrieval benchmark\n\nbank `{args.bank}`: {n:,} references; embedder {emb.id} "
        f"(dim {emb.dim}, loaded in {load_s:.1f} s); torch threads {_threads()}; "
        f"{os.cpu_count()} CPUs, load average at start {os.getloadavg()[0]:.1f}\n"
    )

    # -- embedding throughput: the embed stage's work per batch ---------------------------------
    cache = Path(args.cache) / f"{emb.fingerprint}-{n}.npz" if args.cache else None
    timed = refs if not (cache and cache.exists()) else refs.slice(0, min(args.sample, n))
    batches = []
    t = time.perf_counter()
    for rb in timed.to_batches(max_chunksize=args.batch):
        cols = {c: rb.column(c).to_numpy(zero_copy_only=False) for c in INPUT_COLUMNS}
        batches.append(to_arrow(step(cols), emb.dim))
    embed_s = time.perf_counter() - t
    n_timed = timed.num_rows
    if cache and cache.exists():
        # vectors of every ref from an earlier run with the same embedder and bank size: only the
        # throughput sample above was embedded this time
        vec = np.load(cache)["vectors"]
        batches = [
            to_arrow(
                {
                    "ref_id": refs.column("ref_id").to_numpy(zero_copy_only=False),
                    "embedder": np.full(n, emb.id, dtype=object),
                    "content_hash": refs.column("content_hash").to_numpy(zero_copy_only=False),
                    "vector": vec,
                },
                emb.dim,
            )
        ]
    elif cache:
        cache.parent.mkdir(parents=True, exist_ok=True)
        np.savez(
            cache,
            vectors=np.concatenate([b.column("vector").flatten().to_numpy().reshape(-1, emb.dim) for b in batches]),
        )
    tok = emb._model.tokenizer
    sample = refs.column("text").to_pylist()[:500]
    n_tokens = np.mean([len(tok(s, truncation=False)["input_ids"]) for s in sample])
    bank = Bank(out_dir)
    t = time.perf_counter()
    bank.write("embeddings", EMBEDDINGS_SCHEMA(emb.dim), batches, emb.lineage())
    write_s = time.perf_counter() - t
    table = bank.table("embeddings")
    print("## Embedding\n")
    print("| refs | seconds | refs/s | mean word pieces per ref | write to LanceDB |")
    print("|---|---|---|---|---|")
    print(f"| {n_timed:,} | {embed_s:.1f} | **{n_timed / embed_s:.1f}** | {n_tokens:.0f} | {write_s:.2f} s |\n")
    if n_timed < n:
        print(f"(throughput measured on the first {n_timed:,} refs; the other vectors came from --cache)\n")

    # -- queries ----------------------------------------------------------------------------
    rng = np.random.default_rng(0)
    qrows = rng.choice(n, size=min(args.queries, n), replace=False)
    texts = refs.column("text").to_pylist()
    ids = refs.column("ref_id").to_pylist()
    qtexts = [perturb(texts[i], rng) for i in qrows]
    q = emb.embed(qtexts)
    sources = [ids[i] for i in qrows]
    vectors = np.concatenate([b.column("vector").flatten().to_numpy().reshape(-1, emb.dim) for b in batches])

    def numpy_exact(qv):
        s = qv @ vectors.T
        top = np.argpartition(-s, args.k - 1, axis=1)[:, : args.k]
        return np.take_along_axis(top, np.argsort(-np.take_along_axis(s, top, 1), 1), 1)

    def source_hit(hits) -> float:
        return float(np.mean([src in [r for r, _ in h] for src, h in zip(sources, hits)]))

    build_index(table, threshold=n + 1)  # make sure no index: exact rows first
    exact = latencies(lambda qv: search(table, qv, k=args.k, exact=True), q)
    brute = latencies(numpy_exact, q)
    exact_hits = search(table, q, k=args.k, exact=True)
    truth, _ = exact_topk(table, q, k=args.k)
    same_ids = np.mean([[r for r, _ in a] == [r for r, _ in b] for a, b in zip(exact_hits, truth)])
    # where the id lists differ, are the scores the same (ties: duplicate references)?
    same_scores = np.mean(
        [np.allclose([s for _, s in a], [s for _, s in b], atol=1e-5) for a, b in zip(exact_hits, truth)]
    )
    rows = [
        ("exact: LanceDB flat scan", None, exact, 1.0, source_hit(exact_hits)),
        ("exact: numpy brute force (vectors in RAM)", None, brute, 1.0, source_hit(truth)),
    ]
    builds = {}
    for index_type in INDEX_TYPES:
        t = time.perf_counter()
        report = build_index(table, threshold=0, index_type=index_type)
        builds[index_type] = (time.perf_counter() - t, report)
        rec = recall_at_k(table, q, k=args.k)
        lat = latencies(lambda qv: search(table, qv, k=args.k), q)
        rows.append((f"ANN: {index_type}", builds[index_type][0], lat, rec, source_hit(search(table, q, k=args.k))))

    print(f"## Search: {len(q)} queries, k = {args.k}\n")
    print(
        f"LanceDB's flat scan and numpy return the same top-{args.k} ids for {same_ids:.0%} of queries "
        f"and the same top-{args.k} scores (within 1e-5) for {same_scores:.0%}: where the ids differ "
        "they are ties (references with identical text have identical vectors).\n"
    )
    print(
        f"| search | build s | recall@{args.k} vs exact | source in top {args.k} | single p50 ms | "
        "single p95 ms | batched ms/query | single p50 speed-up vs flat | batched speed-up vs flat |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for name, build_s, lat, rec, src in rows:
        print(
            f"| {name} | {'-' if build_s is None else f'{build_s:.1f}'} | {rec:.3f} | {src:.2f} | "
            f"{lat['p50']:.2f} | {lat['p95']:.2f} | {lat['batched']:.3f} | "
            f"{exact['p50'] / lat['p50']:.2f}x | {exact['batched'] / lat['batched']:.2f}x |"
        )
    print()
    for index_type, (_, report) in builds.items():
        params = {k: v for k, v in report.items() if k not in ("index", "rows", "threshold") and v}
        print(f"- {index_type}: {params}")


def _threads() -> int:
    import torch

    return torch.get_num_threads()


if __name__ == "__main__":
    main()
