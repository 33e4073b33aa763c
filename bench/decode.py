"""Decode speed with explicit memory vs no retrieval vs RAG, same weights, same process: the
shape of the paper's Table 21 (batch 32, 128 input + 128 output tokens, throughput = 32 x 128 /
total time, several repetitions, medians; paper §7.5; docs/paper.md).

    .venv/bin/python bench/decode.py -c configs/demo.yaml [--repeats 5]          # CPU, demo bank
    python bench/decode.py --synthetic --device cuda --preset paper-2.4b --dtype bfloat16   # GPU

Bank path (default): the demo bank's model (`small`, random weights are fine for speed), its
real embeddings (queries by the embedder that wrote them; searched in RAM, exactly, for a bank
under 1 GiB of vectors, else through LanceDB) and its memories on disk (MemoryStore.fetch).
Prompts: the first 128 tokens of held-out training sequences (real FOLDOC text). Rows:
- none: KV-cache decoding, no retrieval (the baseline every ratio is against);
- memory, cold cache: a fresh MemoryStore (empty RAM cache; its ref_id index opened untimed)
  and the retriever's reference-token cache emptied, so every memory is read from the Lance
  table on disk (the OS page cache is warm after the first repeat: this machine cannot drop it
  without root);
- memory, warm cache: the same store again, every memory already decoded in RAM; prefetch as
  serving decides it (engine.prefetch_pays: a thread only where it has a core of its own);
- memory, warm, prefetch thread / no prefetch: the next chunk's retrieval forced into a thread
  overlapped with decoding / forced synchronous;
- memory, retrieval precomputed: the retriever's answers replayed from a dict: what reading
  memories costs the model itself (the chunk masks, the swaps), retrieval excluded;
- rag: the 5 references retrieved once with the prompt's last 64 tokens, their text prepended.
Each memory row does 3 retrievals per prompt as in the paper (2 prompt chunks, 1 swap).

--synthetic (for a GPU without the bank's Python stack): random prompts; the "bank" is a pool of
--pool random memories of the preset's shape in pinned host RAM, "retrieval" picks 5 distinct
random ids per query (no embedder, no search: only the model's side and the host-to-device copy
are measured); RAG prepends 5 random 128-token references.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
# Idle OpenMP threads spin by default; on cores shared with other processes a spinning team
# burns its time slice waiting (runs measured 2 s and 60 s for the same work). Passive waiting
# makes the rows comparable; read when libgomp loads, so before torch is imported.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

from model.generation import Retrieved, generate_with_memory  # noqa: E402


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


class Replay:
    """A retriever that answers from recorded results: retrieval cost removed, same memories."""

    def __init__(self, inner):
        self.inner, self.memo = inner, {}

    def __call__(self, queries, contexts):
        key = tuple(tuple(q.tolist()) for q in queries)
        if key not in self.memo:
            self.memo[key] = self.inner(queries, contexts)
        return self.memo[key]


class SyntheticRetriever:
    """Random distinct ids per query from a pinned host pool of random memories."""

    def __init__(self, cfg, pool: int, per_query: int, dtype, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        shape = (pool, cfg.n_mem_layers, 2, cfg.n_kv_heads, cfg.mem_top_k, cfg.head_dim)
        self.pool = torch.randn(shape, generator=g).to(dtype)
        if torch.cuda.is_available():
            self.pool = self.pool.pin_memory()
        self.per_query, self.g, self.k = per_query, g, cfg.mem_top_k

    def __call__(self, queries, contexts):
        n = len(queries)
        ids = torch.stack([torch.randperm(len(self.pool), generator=self.g)[: self.per_query] for _ in range(n)])
        mems = self.pool[ids.reshape(-1)].reshape(n, self.per_query, *self.pool.shape[1:])
        mask = torch.ones(n, self.per_query, self.k, dtype=torch.bool)
        return Retrieved(mems, mask, [[str(i) for i in row] for row in ids.tolist()])


def timed_once(fn, device: str, before=None) -> tuple[float, float]:
    """(wall seconds, process CPU seconds) of one call; `before` runs untimed."""
    if before:
        before()
    sync(device)
    t0, c0 = time.perf_counter(), time.process_time()
    fn()
    sync(device)
    return time.perf_counter() - t0, time.process_time() - c0


def bank_rows(args) -> tuple[dict, dict]:
    from jobs.config import load_config
    from jobs.inference.engine import Inference
    from pipelines.train_data import split_rows
    from storage.memory_store import MemoryStore

    cfg = load_config(args.config, args.overrides)
    dtype = getattr(torch, args.dtype)
    inf = Inference(cfg, device=args.device, dtype=dtype)
    rows = split_rows(inf.bank, "heldout", cfg.train.heldout_fraction)[: args.batch]
    seqs = inf.bank.dataset("train_sequences").take(rows, columns=["token_ids"]).column("token_ids").to_pylist()
    # windows of held-out sequences: the first of each, then the second of each, ...
    windows = [(j, i) for i, s in enumerate(seqs) for j in range(0, len(s) - args.input + 1, args.input)]
    prompts = [seqs[i][j : j + args.input] for j, i in sorted(windows)][: args.batch]
    if len(prompts) < args.batch:
        raise SystemExit(f"need {args.batch} held-out sequences of >= {args.input} tokens")
    retriever = inf.memory_retriever()
    n_out = args.output

    def gen(mode, **kw):
        return lambda: inf.generate_tokens(
            prompts, mode, max_new_tokens=n_out, batch_size=args.batch, stop_at_eos=False, **kw
        )

    def fresh_store():
        retriever.store = inf._store = MemoryStore(
            inf.bank, inf.model_hash, cache_size=inf.ic.cache_size, cache_bytes=inf.ic.cache_bytes
        )
        retriever.clear_cache()  # the references' tokens too: cold is the first request's cost

    replay = Replay(retriever)
    batch = inf._batch(prompts, n_out)

    def replayed():
        generate_with_memory(inf.model, batch, n_out, replay)

    replayed()  # record the answers (untimed)
    gen("none")()  # warm-up: first-call costs (allocations, lazy imports) out of every row
    plans = {
        "none": (gen("none"), None),
        "memory, cold cache": (gen("memory"), fresh_store),
        "memory, warm cache": (gen("memory"), None),
        "memory, warm, prefetch thread": (gen("memory", prefetch=True), None),
        "memory, warm, no prefetch": (gen("memory", prefetch=False), None),
        "memory, retrieval precomputed": (replayed, None),
        "rag": (gen("rag"), None),
    }
    info = {
        "model": f"{cfg.model.n_layers} layers, d {cfg.model.d_model} (bank model {inf.model_hash[:12]})",
        "retriever": retriever,
        "inf": inf,
        "batch": batch,
    }
    return plans, info


def synthetic_rows(args) -> tuple[dict, dict]:
    from model import Memory3, ModelConfig

    cfg = ModelConfig.from_preset(args.preset, **({"mem_top_k": args.mem_top_k} if args.mem_top_k else {}))
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    with torch.device(args.device):
        model = Memory3(cfg).to(dtype).eval()
    g = torch.Generator().manual_seed(1)
    prompt = torch.randint(4, cfg.vocab_size, (args.batch, args.input), generator=g).to(args.device)
    refs = torch.randint(4, cfg.vocab_size, (args.batch, cfg.mems_per_chunk * cfg.ref_max_tokens), generator=g)
    rag_prompt = torch.cat([refs.to(args.device), prompt], dim=1)
    r = SyntheticRetriever(cfg, args.pool, cfg.mems_per_chunk, dtype)
    on_gpu = args.device.startswith("cuda")
    n = args.output
    plans = {
        "none": (lambda: generate_with_memory(model, prompt, n), None),
        # a retrieval thread pays only where it has a core of its own (jobs/inference/engine.py)
        "memory (synthetic retrieval)": (lambda: generate_with_memory(model, prompt, n, r, prefetch=on_gpu), None),
        "rag": (lambda: generate_with_memory(model, rag_prompt, n), None),
    }
    plans["none"][0]()  # warm-up (CUDA context, kernels)
    return plans, {"model": f"{args.preset}, {model.num_params() / 1e6:,.1f}M non-embedding parameters"}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("-c", "--config", default="configs/demo.yaml")
    p.add_argument("--set", dest="overrides", action="append", default=[])
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--input", type=int, default=128)
    p.add_argument("--output", type=int, default=128)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--synthetic", action="store_true")
    p.add_argument("--preset", default="small")
    p.add_argument("--pool", type=int, default=4096, help="--synthetic: memories in the host pool")
    p.add_argument(
        "--mem-top-k",
        type=int,
        default=None,
        help="--synthetic: tokens per memory layer and KV head (default: the preset's)",
    )
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    plans, info = synthetic_rows(args) if args.synthetic else bank_rows(args)
    inf = info.get("inf")
    r = info.get("retriever")
    walls = {name: [] for name in plans}
    cpus = {name: [] for name in plans}
    spent = {name: {} for name in plans}
    # modes interleaved within every repeat: load from other processes then hits every mode
    # alike, and each repeat gives a paired ratio against the baseline it ran beside
    for _ in range(args.repeats):
        for name, (fn, before) in plans.items():
            spent0 = dict(r.seconds) if r else {}
            wall, cpu = timed_once(fn, args.device, before)
            walls[name].append(wall)
            cpus[name].append(cpu)
            for k in r.seconds if r else {}:
                spent[name][k] = spent[name].get(k, 0) + (r.seconds[k] - spent0.get(k, 0)) / args.repeats
    tokens = args.batch * args.output
    med = statistics.median
    print(
        f"decode speed: batch {args.batch}, {args.input} in + {args.output} out, {args.repeats} repeats "
        f"(median), {args.device} {args.dtype}, {torch.get_num_threads()} thread(s), OMP_WAIT_POLICY="
        f"{os.environ.get('OMP_WAIT_POLICY')}; model {info['model']}"
    )
    print(
        "| mode | median s | tokens/s | speed vs none (paired median) | CPU s | CPU speed vs none (paired "
        "median) | retrieval s per run (embed / search / filter / fetch) |"
    )
    print("|---|---|---|---|---|---|---|")
    for name in plans:
        ratio = med([b / w for b, w in zip(walls["none"], walls[name])])
        cpu_ratio = med([b / c for b, c in zip(cpus["none"], cpus[name])])
        parts = (
            " / ".join(f"{spent[name].get(k, 0):.3f}" for k in ("embed", "search", "filter", "fetch"))
            if spent[name]
            else "-"
        )
        print(
            f"| {name} | {med(walls[name]):.3f} | {tokens / med(walls[name]):,.0f} | {ratio:.3f} | "
            f"{med(cpus[name]):.2f} | {cpu_ratio:.3f} | {parts} |"
        )
    print(f"load average at the end: {' '.join(f'{x:.1f}' for x in os.getloadavg())}")
    if inf is not None and inf._store is not None:
        print(f"memory cache of the last store: {inf._store.hits} hits, {inf._store.misses} misses")
    return 0


if __name__ == "__main__":
    sys.exit(main())
