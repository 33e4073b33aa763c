"""Choosing the retriever (issue 13): each candidate against exact MiniLM, measured in one run.

    .venv/bin/m3 ingest -c configs/demo.yaml --set bank.uri=/tmp/emb-bank    # the demo's 18,218 refs
    .venv/bin/python bench/retrievers.py --bank /tmp/emb-bank --minilm-vectors bank/demo

Candidates (--candidates): `minilm` (the baseline every ratio is against), `static-minilm` (the
static embedding distilled from it, pipelines/static_embedder.py), `bm25` (LanceDB's native
full-text index on the references' text, as storage/lexical.py builds and searches it for
`retrieval.method: bm25`; no vectors). Per candidate:
- load: seconds to load the model (a static model's one-off distillation is not in it: the cache
  is built before timing, and its build time is printed once);
- refs/s: references embedded per second, the embed stage's work (`EmbedRefs` batches of 256,
  no Ray), on every reference; for bm25 the rate of the full-text index build;
- query ms: one 64-token-sized query embedded alone, median over the queries: what each swap
  point of `m3 generate` pays per call (bench/decode.py measures the whole decode);
- index s: LanceDB write + the ANN index the embed stage builds (IVF_HNSW_SQ) on every vector;
- recall@5 vs MiniLM: |top5(candidate) & top5(exact MiniLM)| / 5 for the same query text, exact
  search on both sides (brute force over the vectors in RAM), averaged over the queries;
- source in top 5: the perturbed-reference queries of bench/retrieval.py (a 32-word window with
  20 % of the words dropped, 200 references, seed 0): how often the reference a query came from
  is retrieved, by exact search and through the ANN index.

--minilm-vectors BANK reuses the MiniLM vectors of another bank built from the same references
(matched on ref_id and content_hash, embedder id checked): MiniLM over 18k references takes
minutes on 2 cores. Its refs/s is then measured on the first --sample references only.
Never writes to --bank; tables go to a scratch directory. Output: markdown on stdout.
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
sys.path.insert(0, str(Path(__file__).resolve().parent))

from retrieval import perturb  # noqa: E402 - the same queries as bench/retrieval.py

from pipelines.embed_step import EMBEDDINGS_SCHEMA, INPUT_COLUMNS, EmbedRefs, to_arrow  # noqa: E402
from storage.bank import Bank  # noqa: E402
from storage.vectors import build_index, search  # noqa: E402


def brute_topk(q: np.ndarray, vectors: np.ndarray, k: int) -> np.ndarray:
    s = q @ vectors.T
    top = np.argpartition(-s, k - 1, axis=1)[:, :k]
    return np.take_along_axis(top, np.argsort(-np.take_along_axis(s, top, 1), 1), 1)


def reuse_vectors(bank_uri: str, embedder_id: str, ids: list[str], hashes: list[str]) -> np.ndarray | None:
    bank = Bank(bank_uri)
    t = bank.dataset("embeddings").to_table(columns=["ref_id", "embedder", "content_hash", "vector"])
    if set(t.column("embedder").to_pylist()) != {embedder_id}:
        return None
    dim = len(t.column("vector")[0])
    vec = t.column("vector").combine_chunks().flatten().to_numpy().reshape(-1, dim)
    at = {
        (r, h): i for i, (r, h) in enumerate(zip(t.column("ref_id").to_pylist(), t.column("content_hash").to_pylist()))
    }
    rows = [at.get((r, h)) for r, h in zip(ids, hashes)]
    if any(r is None for r in rows):
        return None
    return vec[rows]


def embed_all(step: EmbedRefs, refs, batch: int) -> tuple[np.ndarray, float]:
    out = []
    t = time.perf_counter()
    for rb in refs.to_batches(max_chunksize=batch):
        cols = {c: rb.column(c).to_numpy(zero_copy_only=False) for c in INPUT_COLUMNS}
        out.append(step(cols)["vector"])
    return np.concatenate(out), time.perf_counter() - t


def dense(spec: str, refs, qtexts, chunk_texts, args, reuse: str | None) -> dict:
    t = time.perf_counter()
    step = EmbedRefs(spec)
    load_s = time.perf_counter() - t
    emb = step.embedder
    ids, hashes = refs.column("ref_id").to_pylist(), refs.column("content_hash").to_pylist()
    vectors = reuse_vectors(reuse, emb.id, ids, hashes) if reuse else None
    if vectors is None:
        vectors, embed_s = embed_all(step, refs, args.batch)
        timed = refs.num_rows
    else:
        timed = min(args.sample, refs.num_rows)
        _, embed_s = embed_all(step, refs.slice(0, timed), args.batch)
    emb.embed(chunk_texts[:1])
    single = []
    for text in chunk_texts:
        t = time.perf_counter()
        emb.embed([text])
        single.append(time.perf_counter() - t)
    q = emb.embed(qtexts)
    # the embed stage's table and index, in a scratch bank
    bank = Bank(tempfile.mkdtemp(prefix="m3-retrievers-", dir=args.scratch))
    batch = to_arrow(
        {
            "ref_id": np.asarray(ids, dtype=object),
            "embedder": np.full(len(ids), emb.id, dtype=object),
            "content_hash": np.asarray(hashes, dtype=object),
            "vector": vectors,
        },
        emb.dim,
    )
    t = time.perf_counter()
    bank.write("embeddings", EMBEDDINGS_SCHEMA(emb.dim), [batch], emb.lineage())
    build_index(bank.table("embeddings"), threshold=0)
    index_s = time.perf_counter() - t
    ann = [[r for r, _ in h] for h in search(bank.table("embeddings"), q, k=args.k)]
    exact = [[ids[i] for i in row] for row in brute_topk(q, vectors, args.k)]
    return {
        "name": spec,
        "id": emb.id,
        "dim": emb.dim,
        "load_s": load_s,
        "refs_per_s": timed / embed_s,
        "timed": timed,
        "query_ms": float(np.median(single)) * 1e3,
        "index_s": index_s,
        "exact": exact,
        "ann": ann,
        "vectors": vectors,
    }


def bm25(refs, qtexts, chunk_texts, args) -> dict:
    import lancedb
    import pyarrow as pa

    from storage.lexical import bm25_search, build_fts_index

    db = lancedb.connect(tempfile.mkdtemp(prefix="m3-bm25-", dir=args.scratch))
    table = db.create_table("refs", pa.table({"ref_id": refs.column("ref_id"), "text": refs.column("text")}))
    t = time.perf_counter()
    build_fts_index(table)  # the index `m3 embed` builds for retrieval.method bm25/hybrid
    index_s = time.perf_counter() - t

    def top(text: str) -> list[str]:  # the search pairing and serving run (query cleaning included)
        return [rid for rid, _ in bm25_search(table, [text], args.k)[0]]

    top(chunk_texts[0])
    single = []
    for text in chunk_texts:
        t = time.perf_counter()
        top(text)
        single.append(time.perf_counter() - t)
    hits = [top(t) for t in qtexts]
    return {
        "name": "bm25",
        "id": "LanceDB FTS (BM25)",
        "dim": 0,
        "load_s": 0.0,
        "refs_per_s": refs.num_rows / index_s,
        "timed": refs.num_rows,
        "query_ms": float(np.median(single)) * 1e3,
        "index_s": index_s,
        "exact": hits,
        "ann": hits,
        "vectors": None,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--bank", default="/tmp/emb-bank", help="bank directory with a refs table")
    ap.add_argument("--candidates", default="minilm,static-minilm,bm25")
    ap.add_argument("--minilm-vectors", default=None, help="bank whose MiniLM embeddings cover the same refs")
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--k", type=int, default=5)
    ap.add_argument("--batch", type=int, default=256, help="refs per EmbedRefs call (a Ray batch)")
    ap.add_argument("--sample", type=int, default=512, help="refs timed when vectors are reused")
    ap.add_argument("--scratch", default=None, help="directory for the scratch tables")
    ap.add_argument("--limit", type=int, default=None, help="only the first N refs (a quick check)")
    args = ap.parse_args()

    refs = Bank(args.bank).dataset("refs").to_table(columns=INPUT_COLUMNS)
    if args.limit:
        refs = refs.slice(0, args.limit)
    n = refs.num_rows
    texts, ids = refs.column("text").to_pylist(), refs.column("ref_id").to_pylist()
    rng = np.random.default_rng(0)
    qrows = rng.choice(n, size=min(args.queries, n), replace=False)
    qtexts = [perturb(texts[i], rng) for i in qrows]
    sources = [ids[i] for i in qrows]
    # decode-time queries: a 64-token chunk is about 45 words of FOLDOC text
    chunk_texts = [" ".join(texts[i].split()[:45]) for i in qrows[:50]]

    names = [c.strip() for c in args.candidates.split(",") if c.strip()]
    if names[0] != "minilm":
        raise SystemExit("--candidates must start with minilm: it is the baseline of every ratio")
    print(
        f"# Choosing the retriever\n\nbank `{args.bank}`: {n:,} references; {len(qtexts)} perturbed-reference "
        f"queries (seed 0); {os.cpu_count()} CPUs, load average at start {os.getloadavg()[0]:.1f}\n"
    )
    if "static-minilm" in names:
        from pipelines.embedder import bundled_minilm_dir, fingerprint_dir
        from pipelines.static_embedder import static_dir

        cached = (static_dir(fingerprint_dir(bundled_minilm_dir())) / "model.safetensors").is_file()
        t = time.perf_counter()
        EmbedRefs("static-minilm")
        print(f"static-minilm distillation: {'cached' if cached else f'built in {time.perf_counter() - t:.1f} s'}\n")

    results = []
    for name in names:
        if name == "bm25":
            results.append(bm25(refs, qtexts, chunk_texts, args))
        else:
            results.append(
                dense(name, refs, qtexts, chunk_texts, args, args.minilm_vectors if name == "minilm" else None)
            )
        print(f"<!-- {name} done at load {os.getloadavg()[0]:.1f} -->", flush=True)
    base = results[0]
    print(
        f"| retriever | dim | load s | refs/s | vs MiniLM | query ms (1 chunk) | vs MiniLM | index s | "
        f"recall@{args.k} vs exact MiniLM | source in top {args.k} (exact) | source in top {args.k} (ANN) |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        rec = np.mean([len(set(a) & set(b)) / args.k for a, b in zip(r["exact"], base["exact"])])
        src_exact = np.mean([s in h for s, h in zip(sources, r["exact"])])
        src_ann = np.mean([s in h for s, h in zip(sources, r["ann"])])
        print(
            f"| {r['name']} ({r['id']}) | {r['dim'] or '-'} | {r['load_s']:.1f} | {r['refs_per_s']:,.0f} | "
            f"**{r['refs_per_s'] / base['refs_per_s']:.1f}x** | {r['query_ms']:.2f} | "
            f"{base['query_ms'] / r['query_ms']:.1f}x faster | {r['index_s']:.1f} | {rec:.3f} | {src_exact:.3f} | "
            f"{src_ann:.3f} |"
        )
    print()
    for r in results:
        if r["timed"] < n:
            print(
                f"- {r['name']}: refs/s over the first {r['timed']:,} references; its vectors of all {n:,} "
                f"from --minilm-vectors {args.minilm_vectors}"
            )


if __name__ == "__main__":
    main()
