"""The bank at N references (issue 26): every stage's cost per reference, RSS, disk, latency.

    .venv/bin/python bench/scale.py [--sizes 10000 100000 1000000] [--dir /tmp/m3-scale]

For each size, a bank of at least N references built by the real stages, in one process on one
embedded Ray (started, and warmed by an untimed build of ~300 references, before any clock):
configs/demo.yaml with the `tiny` model in the paper's memory format (model.mem_top_k=8 tokens
per memory layer and KV head, encode.codec=vq: FAISS OPQ-Residual-PQ), references of <= 128
tokens, the demo's static-minilm retriever and its ANN index (IVF_HNSW_SQ from 10k vectors).
The corpus: FOLDOC replicated with word-level variation (bench/scale_corpus.py says why it is
representative); a tenth of the documents is also training text, so pair runs on that sample.

Measured per size:
- ingest, embed (+ its index build, timed alone), encode, pair: wall and CPU seconds per 1k
  references (CPU = this process + every process of its tree: Ray's raylet and workers, sampled
  every 0.25 s with psutil, + waited children), peak RSS of the driver, of the Ray workers
  (their sum and the largest one; idle workers of earlier stages stay alive and count in the
  sum) and of other children;
- bytes per reference on disk per table;
- search: p50/p99 of one ANN query (k=5, query vector given) and of embedding the query text;
- fetch of 5 and 160 memories (MemoryStore, slab): cold = the slab's pages evicted before each
  batch (posix_fadvise DONTNEED on our files only: no machine-wide cache drop on a shared box),
  warm = a new store on warm files (bench/fetch.py's "store miss, warm files");
- decode tokens/s with memory (cold and warm cache) against none: bench/decode.py's rows, batch
  32, 128 + 128 tokens;
- `m3 sql` count(*) over memories and a refs-memories join, `m3 bank stats`: in process and as
  the command (a fresh process: imports included);
- `m3 rebuild` with nothing changed (publishes the build), then after 1 % of the documents are
  edited, against the full build (ingest + embed + encode);
- `m3 bank compact`: seconds and bytes before/after.

Every figure is printed with its ratio to the first size's. Results: bench/results/scale-<date>.json
(written after each size) and scale-<date>.png (wall seconds per 1k references against N, log x).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # bench/decode.py: spinning OpenMP threads on shared cores
os.environ.setdefault("M3_PROGRESS", "0")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.append(str(Path(__file__).resolve().parent))

import psutil  # noqa: E402
from scale_corpus import TRAIN_EVERY, Corpus  # noqa: E402
from scale_report import plot, table  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
REFS_PER_DOC = 1.35  # measured on this corpus: 1.41 at 2k references; the margin covers its spread
MARGIN = 1.05
SETTINGS = [
    "model.preset=tiny",
    "model.mem_top_k=8",  # the paper's sparsity
    "model.ref_max_tokens=128",
    "encode.codec=vq",  # the paper's codec
    "encode.checkpoint=null",
    "train.heldout_fraction=0.2",  # decode needs 32 held-out prompts from the training sample
]


class Tree(threading.Thread):
    """Samples this process and its descendants (Ray's raylet, gcs and workers are below the
    driver when ray.init starts the cluster) every `period` s: RSS and CPU times per pid."""

    def __init__(self, period: float = 0.25):
        super().__init__(daemon=True)
        self.me, self.period, self.procs, self.cpu = psutil.Process(), period, {}, {}
        self.lock, self.stop_ = threading.Lock(), threading.Event()
        self.reset()

    def kind(self, p: psutil.Process) -> str:
        try:
            name, cmd = p.name(), " ".join(p.cmdline()[:3])
        except psutil.Error:
            return "gone"
        return "worker" if name.startswith("ray::") or "default_worker" in cmd else ("ray" if "ray" in cmd else "child")

    def reset(self) -> None:
        with self.lock:
            self.peak = {"driver": 0, "workers_sum": 0, "worker_max": 0, "ray_other_sum": 0, "child_max": 0}
            self.start_cpu = dict(self.cpu)

    def sample(self) -> None:
        rss = {"worker": [], "ray": [], "child": []}
        try:
            kids = self.me.children(recursive=True)
        except psutil.Error:
            return
        for p in kids:
            q = self.procs.setdefault(p.pid, p)
            try:
                k = getattr(q, "_m3_kind", None) or self.kind(q)
                q._m3_kind = k
                mem, t = q.memory_info().rss, q.cpu_times()
            except psutil.Error:
                continue
            rss.setdefault(k, []).append(mem)
            if k != "child":  # a child's CPU comes through RUSAGE_CHILDREN when it is waited
                self.cpu[p.pid] = t.user + t.system
        with self.lock:
            pk = self.peak
            pk["driver"] = max(pk["driver"], self.me.memory_info().rss)
            pk["workers_sum"] = max(pk["workers_sum"], sum(rss["worker"]))
            pk["worker_max"] = max(pk["worker_max"], max(rss["worker"], default=0))
            pk["ray_other_sum"] = max(pk["ray_other_sum"], sum(rss["ray"]))
            pk["child_max"] = max(pk["child_max"], max(rss["child"], default=0))

    def run(self) -> None:
        while not self.stop_.wait(self.period):
            self.sample()

    def tree_cpu(self) -> float:
        self.sample()
        with self.lock:
            return sum(c - self.start_cpu.get(pid, 0.0) for pid, c in self.cpu.items())


def measured(tree: Tree, fn, *a, **kw) -> tuple[object, dict]:
    """fn's result and {wall, cpu (whole tree), peak RSS bytes}."""
    ch = resource.getrusage(resource.RUSAGE_CHILDREN)
    tree.reset()
    start = tree.me.memory_info().rss  # the driver's RSS never falls back: its growth is what a stage adds
    w, c = time.perf_counter(), time.process_time()
    out = fn(*a, **kw)
    wall, cpu = time.perf_counter() - w, time.process_time() - c
    ch2 = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu += tree.tree_cpu() + (ch2.ru_utime + ch2.ru_stime) - (ch.ru_utime + ch.ru_stime)
    rss = {f"rss_{k}": v for k, v in tree.peak.items()}
    return out, {"wall_s": round(wall, 3), "cpu_s": round(cpu, 3), "rss_driver_start": start, **rss}


def du(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.exists() else 0


def disk(bank: Path) -> dict:
    out = {p.name.removesuffix(".lance"): du(p) for p in bank.glob("*.lance")}
    out["other (_slabs, _memo, quantizers, ...)"] = du(bank) - sum(out.values())
    return out


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, math.ceil(q * len(xs)) - 1)]


def evict(files: list[Path]) -> None:
    """Our files' pages out of the OS page cache (the rest of the machine's cache is left alone)."""
    for f in files:
        fd = os.open(f, os.O_RDONLY)
        try:
            os.fdatasync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def search_latency(cfg, bank, n: int = 300) -> dict:
    import numpy as np

    from pipelines.embedder import load_embedder
    from storage.vectors import search, search_params

    table = bank.table("embeddings")
    texts = bank.dataset("refs").sample(n, columns=["text"]).column("text").to_pylist()
    texts = [" ".join(t.split()[:24]) for t in texts]  # a query is a chunk's worth of text
    emb = load_embedder(cfg.retrieval.embedder)
    params, t_emb, t_search = search_params(table), [], []
    search(table, emb.embed(texts[:3]), k=5, params=params)  # first-call costs out
    for t in texts:
        w = time.perf_counter()
        v = emb.embed([t])
        t_emb.append(time.perf_counter() - w)
        w = time.perf_counter()
        search(table, np.asarray(v), k=5, params=params)
        t_search.append(time.perf_counter() - w)
    ms = lambda xs, q: round(pct(xs, q) * 1e3, 3)  # noqa: E731
    return {
        "queries": n,
        "index": (params and params.index_type) or "exact",
        "search_p50_ms": ms(t_search, 0.5),
        "search_p99_ms": ms(t_search, 0.99),
        "embed_query_p50_ms": ms(t_emb, 0.5),
        "embed_query_p99_ms": ms(t_emb, 0.99),
    }


def fetch_latency(bank, rng, batches: int = 20) -> dict:
    from storage.memory_store import MemoryStore
    from storage.slab import paths

    mh = bank.metadata("memories")["model_hash"]
    out = {}
    for b in (5, 160):
        store = MemoryStore(bank, mh, cache_size=b, slab="require")  # opened untimed: the ref_id index
        ids = list(store.row_of)
        files = [p for p in paths(bank, store.ds.version) if Path(p).exists()]
        picks = [[ids[i] for i in rng.sample(range(len(ids)), b)] for _ in range(batches)]
        cold = []
        for q in picks:
            evict(files)
            w = time.perf_counter()
            store.fetch(q)
            cold.append(time.perf_counter() - w)
        warm_store, warm = MemoryStore(bank, mh, cache_size=b, slab="require"), []
        for q in picks:
            store.fetch(q)  # pages in (the first store's cache holds one batch: the new store misses)
        for q in picks:
            w = time.perf_counter()
            warm_store.fetch(q)
            warm.append(time.perf_counter() - w)
        out[f"fetch{b}_cold_ms"] = round(statistics.median(cold) * 1e3, 3)
        out[f"fetch{b}_warm_ms"] = round(statistics.median(warm) * 1e3, 3)
        del store, warm_store
    return out


def decode_speed(overrides: list[str], repeats: int) -> dict:
    import torch
    from decode import bank_rows, timed_once  # bench/decode.py

    torch.set_num_threads(1)
    ns = argparse.Namespace(
        config=str(ROOT / "configs" / "demo.yaml"),
        overrides=overrides,
        device="cpu",
        dtype="float32",
        batch=32,
        input=128,
        output=128,
    )
    plans, info = bank_rows(ns)
    names = ("none", "memory, cold cache", "memory, warm cache")
    walls, ret = {k: [] for k in names}, info["retriever"]
    spent = dict.fromkeys(ret.seconds, 0.0)  # where retrieval's time goes, over the warm-cache runs
    for _ in range(repeats):  # interleaved, so load hits every mode alike
        for k in names:
            fn, before = plans[k]
            s0 = dict(ret.seconds)
            walls[k].append(timed_once(fn, "cpu", before)[0])
            if k == "memory, warm cache":
                spent = {p: spent.get(p, 0.0) + (ret.seconds[p] - s0.get(p, 0.0)) / repeats for p in ret.seconds}
    tok = 32 * 128
    out = {
        f"decode_{k.replace(', ', '_').replace(' ', '_')}_tok_s": round(tok / statistics.median(v))
        for k, v in walls.items()
    }
    for k in names[1:]:
        key = k.replace(", ", "_").replace(" ", "_")
        out[f"decode_{key}_vs_none"] = round(statistics.median(n / w for n, w in zip(walls["none"], walls[k])), 3)
    out["decode_memory_warm_s"] = round(statistics.median(walls["memory, warm cache"]), 3)
    out["retrieval_s_per_warm_run"] = {p: round(v, 3) for p, v in spent.items()}
    return out


def command(overrides: list[str], *args: str) -> float:
    """Wall seconds of an `m3` command in a fresh process (what a user waits for)."""
    sets = [x for o in overrides for x in ("--set", o)]
    m3 = [sys.executable, "-m", "jobs", *args[:1], "-c", str(ROOT / "configs" / "demo.yaml"), *sets, *args[1:]]
    w = time.perf_counter()
    subprocess.run(m3, check=True, capture_output=True, cwd=ROOT)
    return round(time.perf_counter() - w, 3)


def build(
    n: int, work: Path, tree: Tree, corpus: Corpus, repeats: int, quick: bool = False, rebuild: bool = True
) -> dict:
    """Every measurement of one size (quick: the stages only, for the warm-up; rebuild=False: no
    1 % rebuild and no compaction, for a size where the rebuild's whole index would take hours)."""
    import random

    from jobs.config import load_config
    from jobs.ops.bank_stats import bank_stats
    from jobs.ops.compact import run_compact
    from jobs.ops.rebuild import run_rebuild
    from jobs.stages import embed as embed_mod
    from jobs.stages.encode import run_encode
    from jobs.stages.ingest import run_ingest
    from jobs.stages.pair import run_pair
    from storage.bank import Bank
    from storage.sql import query

    d = work / f"n{n}"
    n_docs = math.ceil(n / REFS_PER_DOC * MARGIN)
    w = time.perf_counter()
    both, only_bank = corpus.write(d / "corpus", n_docs)
    gen_s = time.perf_counter() - w
    bank_dir = d / "bank"
    overrides = [
        f"corpus.paths=[{both}, {only_bank}]",
        f"corpus.roles={{{both}: both, {only_bank}: bank}}",
        f"bank.uri={bank_dir}",
        *SETTINGS,
    ]
    cfg = load_config(ROOT / "configs" / "demo.yaml", overrides)
    r = {"n_target": n, "documents": n_docs, "corpus_seconds": round(gen_s, 1), "stages": {}}
    stages = r["stages"]

    index_s = {}
    inner = embed_mod.build_reproducible_index

    def timed_index(*a, **kw):
        w = time.perf_counter()
        out = inner(*a, **kw)
        index_s["s"] = time.perf_counter() - w
        return out

    embed_mod.build_reproducible_index = timed_index
    try:
        ing, stages["ingest"] = measured(tree, run_ingest, cfg)
        bank = Bank(str(bank_dir))
        r["references"] = n_refs = bank.dataset("refs").count_rows()
        r["train_sequences"] = bank.dataset("train_sequences").count_rows()
        print(f"[scale] {n:,}: {n_refs:,} references from {n_docs:,} documents", flush=True)
        emb, stages["embed"] = measured(tree, embed_mod.run_embed, cfg)
        r["index"] = {"seconds": round(index_s.get("s", 0), 3), **(emb.get("index") or {})}
    finally:
        embed_mod.build_reproducible_index = inner
    _, stages["encode"] = measured(tree, run_encode, cfg)
    pair, stages["pair"] = measured(tree, run_pair, cfg)
    r["neighbors_rows"] = Bank(str(bank_dir)).dataset("neighbors").count_rows()
    if quick:
        return r
    full_s = sum(stages[s]["wall_s"] for s in ("ingest", "embed", "encode"))
    r["disk_bytes"] = disk(bank_dir)
    _, stages["rebuild_unchanged"] = measured(tree, run_rebuild, cfg)

    bank = Bank(str(bank_dir))
    rng = random.Random(0)
    r["search"] = search_latency(cfg, bank)
    r["fetch"] = fetch_latency(bank, rng)
    try:
        r["decode"] = decode_speed(overrides, repeats)
    except SystemExit as e:  # a small bank's training sample holds too few held-out prompts
        r["decode"] = {"skipped": str(e)}
    sql = {
        "count": "SELECT count(*) FROM memories",
        "join": "SELECT count(*), sum(r.n_tokens) FROM refs r JOIN memories m USING (ref_id)",
    }
    r["sql"] = {}
    for k, q in sql.items():
        (_, rows), m = measured(tree, query, bank, q)
        r["sql"][f"{k}_in_process_s"], r["sql"][f"{k}_rows"] = m["wall_s"], rows[0][0]
        r["sql"][f"{k}_driver_rss"] = m["rss_driver"]
        r["sql"][f"{k}_command_s"] = command(overrides, "sql", q)
    _, m = measured(tree, bank_stats, bank)
    r["sql"]["stats_in_process_s"], r["sql"]["stats_command_s"] = m["wall_s"], command(overrides, "bank", "stats")
    if not rebuild:
        return r

    # the 1 % edit: every 100th document gets a sentence
    corpus.write(d / "corpus", n_docs, edit_every=100)
    cfg = load_config(ROOT / "configs" / "demo.yaml", overrides)
    inc, stages["rebuild_1pct"] = measured(tree, run_rebuild, cfg)
    mem = inc["memories"]
    r["rebuild"] = {
        "full_s": round(full_s, 3),
        "incremental_s": stages["rebuild_1pct"]["wall_s"],
        "ratio": round(stages["rebuild_1pct"]["wall_s"] / full_s, 4),
        "reencoded": mem["added"] + mem["changed"],
        "timings": inc["timings"],
    }
    before = du(bank_dir)
    # keeping one build: with the default 3, every version is still held and compaction is a no-op
    cfg = load_config(ROOT / "configs" / "demo.yaml", [*overrides, "rebuild.keep_builds=1"])
    _, stages["compact"] = measured(tree, run_compact, cfg)
    r["compact"] = {"bytes_before": before, "bytes_after": du(bank_dir)}
    r["disk_bytes_after_compact"] = disk(bank_dir)
    return r


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    ap.add_argument("--dir", default="/tmp/m3-scale", help="work directory (banks and corpora, kept)")
    ap.add_argument("--repeats", type=int, default=3, help="decode repeats")
    ap.add_argument("--out", default=None, help="results JSON (default bench/results/scale-<date>.json)")
    ap.add_argument("--no-warmup", action="store_true")
    ap.add_argument(
        "--no-rebuild-at",
        type=int,
        default=None,
        help="sizes at or above this skip the 1 %% rebuild and compaction (the rebuild rebuilds the whole index)",
    )
    ap.add_argument("--replot", default=None, help="a results JSON: print its table, redraw its PNG, build nothing")
    a = ap.parse_args()
    if a.replot:
        results = json.loads(Path(a.replot).read_text())["results"]
        print(table(results))
        plot(results, Path(a.replot).with_suffix(".png"))
        return 0

    from jobs.config import load_config
    from jobs.runtime import init_ray, quiet_ray_data

    work = Path(a.dir)
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d-%H%M")
    out = Path(a.out) if a.out else RESULTS / f"scale-{stamp}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    init_ray(load_config(ROOT / "configs" / "demo.yaml", SETTINGS).ray)  # Ray's start-up is in no stage
    quiet_ray_data()
    tree = Tree()
    tree.start()
    corpus = Corpus()
    meta = {"argv": sys.argv, "uname": os.uname().nodename, "cpus": os.cpu_count(), "settings": SETTINGS}
    meta["train_every"] = TRAIN_EVERY
    if not a.no_warmup:  # worker processes and their imports started, outside every clock
        build(300, work / "warmup", tree, corpus, 1, quick=True)
    results = []
    for n in a.sizes:
        load0, w = os.getloadavg(), time.perf_counter()
        r = build(n, work, tree, corpus, a.repeats, rebuild=a.no_rebuild_at is None or n < a.no_rebuild_at)
        r["seconds"], r["load"] = round(time.perf_counter() - w, 1), [load0, os.getloadavg()]
        results.append(r)
        out.write_text(json.dumps({**meta, "results": results}, indent=1, default=str))
        print(
            f"\n[scale] {n:,} done in {r['seconds']:.0f} s, load {load0[0]:.1f} -> {os.getloadavg()[0]:.1f}", flush=True
        )
        print(table(results), flush=True)
    plot(results, out.with_suffix(".png"))
    print(f"\n{out}\n{out.with_suffix('.png')}")
    tree.stop_.set()
    import ray

    ray.shutdown()  # our own embedded cluster only
    return 0


if __name__ == "__main__":
    sys.exit(main())
