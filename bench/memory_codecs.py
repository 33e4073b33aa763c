"""Memory codec benchmark: size, compression, reconstruction error and speed of every codec, each
against RawCodec("bfloat16") measured in the same process.

    python bench/memory_codecs.py                      # paper-2.4b and demo shapes, this CPU
    python bench/memory_codecs.py --quick              # smaller samples, capped VQ training

For each memory shape (paper-2.4b: (22, 2, 8, 8, 80); demo = preset "small": (3, 2, 2, 8, 32)):
  bytes per reference, the ratio to the dense bf16 KV of the whole reference (all layers, all
  query heads, every token: 44 x 40 x 128 x 80 x 2 x 2 B for the paper, so raw bf16 is 160x and
  the paper's VQ ~1830x), relative MSE sum((x - x')^2) / sum(x^2) on held-out memories, and
  encode / decode throughput in memories/s with its ratio to raw bf16 (>1: faster than raw).
  Timing: 1 thread and process CPU time by default (steady on a shared machine), every codec
  interleaved, best of --repeats; VQ training uses every core and is timed on the wall clock.

Data. Synthetic "structured" memories: per (layer, K/V, head) group a mean vector (std 0.5) and
per-latent scales (0.5..2) on one rank-16 basis shared by all groups, plus 0.1-std isotropic
noise; so VQ has structure to learn and one quantizer serves every group, as in the paper. For
the demo shape also the real KV of the demo model at random init (encode_references on random
tokens): random weights are enough for the shape figures, and they show how the codecs fare on
activations rather than on a generator of our own. The VQ quantizer is trained on memories that
are not among those measured.
"""

import argparse
import sys
import time
from pathlib import Path

import faiss
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from model import Memory3, ModelConfig, encode_references  # noqa: E402
from model.codecs import (
    Int8Codec,
    RawCodec,
    VQCodec,
    bytes_per_memory,  # noqa: E402
    default_spec,
)


def timed(fns: dict, repeats: int, clock) -> dict:
    """Best time of each fn after one warm-up call; interleaved (a, b, a, b, ...) so a load
    change on a shared machine hits every codec alike, and the minimum because interference
    from other processes only ever adds time."""
    for fn in fns.values():
        fn()
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = clock()
            fn()
            times[name].append(clock() - t0)
    return {name: min(ts) for name, ts in times.items()}


def structured_memories(n: int, shape: tuple, seed: int, rank: int = 16, noise: float = 0.1) -> torch.Tensor:
    L, two, H, k, d = shape
    basis = np.random.default_rng(0).standard_normal((rank, d)) / np.sqrt(rank)  # fixed: shared
    groups = np.random.default_rng(1)  # fixed too: train and test memories come from one model
    mean = 0.5 * groups.standard_normal((L, two, H, 1, d))
    scale = groups.uniform(0.5, 2.0, (L, two, H, 1, rank))
    rng = np.random.default_rng(seed)
    z = rng.standard_normal((n, L, two, H, k, rank)) * scale
    x = mean + z @ basis + noise * rng.standard_normal((n, *shape))
    return torch.from_numpy(x.astype(np.float32))


def model_memories(cfg: ModelConfig, n: int, seed: int) -> torch.Tensor:
    torch.manual_seed(0)  # one model for train and test memories
    model = Memory3(cfg).eval()
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(4, cfg.vocab_size, (n, cfg.ref_max_tokens), generator=gen)
    with torch.no_grad():
        return torch.cat([encode_references(model, t).kv for t in tokens.split(64)])


def dense_bytes(cfg: ModelConfig) -> int:
    """bf16 K and V of every layer and query head for a full reference [paper §3.3]."""
    return cfg.n_layers * cfg.n_heads * cfg.ref_max_tokens * cfg.head_dim * 2 * 2


def rate(x: float) -> str:
    return f"{x:,.0f}" if x >= 100 else f"{x:.3g}"


def rel_mse(x: torch.Tensor, y: torch.Tensor) -> float:
    return float(((x - y) ** 2).sum() / (x**2).sum())


def bench_shape(title: str, cfg: ModelConfig, train: torch.Tensor, test: torch.Tensor, args) -> list[str]:
    shape = tuple(test.shape[1:])
    d = shape[-1]
    vectors = train.reshape(-1, d)
    cores = faiss.omp_get_max_threads()
    t0 = time.perf_counter()
    vq = VQCodec.train(vectors, default_spec(d), seed=0, max_train=args.max_train, niter=args.niter)
    train_s = time.perf_counter() - t0
    codecs = [RawCodec("bfloat16"), RawCodec("float16"), RawCodec("float32"), Int8Codec(), vq]
    base = codecs[0]
    dense = dense_bytes(cfg)
    lines = [
        f"### {title}: memory {shape}, dense reference {dense:,} B ({dense / 2**20:.2f} MiB)",
        "",
        f"VQ `{vq.spec}` ({vq.code_size} B per {d}-dim vector) trained on "
        f"{min(len(vectors), args.max_train or len(vectors)):,} vectors from "
        f"{len(train)} other memories in {train_s:.1f} s "
        f"(niter {args.niter or 'faiss default'}, {cores} threads); measured on "
        f"{len(test)} memories, best of {args.repeats}, {args.threads} thread(s), "
        f"{args.clock_name} time.",
        "",
        "| codec | bytes/ref | vs dense bf16 | vs raw bf16 | rel. MSE | encode mem/s | ×raw | decode mem/s | ×raw |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    payloads = {c.name: c.encode_batch(test) for c in codecs}
    faiss.omp_set_num_threads(args.threads)  # measure on the cores asked for, train on all
    enc = timed({c.name: (lambda c=c: c.encode_batch(test)) for c in codecs}, args.repeats, args.clock)
    dec = timed(
        {c.name: (lambda c=c: c.decode_batch(payloads[c.name], shape)) for c in codecs}, args.repeats, args.clock
    )
    faiss.omp_set_num_threads(cores)
    rows = []
    for codec in codecs:
        back = codec.decode_batch(payloads[codec.name], shape)
        nb = bytes_per_memory(codec, shape)
        rows.append(
            f"| {codec.name} | {nb:,} | {dense / nb:,.0f}× | "
            f"{bytes_per_memory(base, shape) / nb:.2f}× | {rel_mse(test, back):.2e} | "
            f"{rate(len(test) / enc[codec.name])} | {enc[base.name] / enc[codec.name]:.3g} | "
            f"{rate(len(test) / dec[codec.name])} | {dec[base.name] / dec[codec.name]:.3g} |"
        )
    return lines + rows + [""]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="small samples, VQ niter 5")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument(
        "--threads", type=int, default=1, help="torch and faiss threads while timing (VQ training uses every core)"
    )
    p.add_argument(
        "--clock",
        choices=("process", "wall"),
        default=None,
        help="process CPU time (default with 1 thread: steady on a shared machine) "
        "or wall time (default with more threads)",
    )
    p.add_argument("--niter", type=int, default=None, help="cap on VQ training iterations (default: faiss's own)")
    p.add_argument("--max-train", type=int, default=None, help="VQ training vectors at most")
    args = p.parse_args()
    if args.quick:
        args.niter = args.niter or 5
    args.clock_name = args.clock or ("process" if args.threads == 1 else "wall")
    args.clock = time.process_time if args.clock_name == "process" else time.perf_counter
    torch.set_num_threads(args.threads)
    paper, demo = ModelConfig.from_preset("paper-2.4b"), ModelConfig.from_preset("small")
    paper_shape = (paper.n_mem_layers, 2, paper.n_kv_heads, paper.mem_top_k, paper.head_dim)
    demo_shape = (demo.n_mem_layers, 2, demo.n_kv_heads, demo.mem_top_k, demo.head_dim)
    # paper: 2^14 centroids per multi-index half need >= 16384 vectors; 24 memories = 67,584
    n_paper_train, n_paper_test = (6, 4) if args.quick else (24, 8)
    n_demo_train, n_demo_test = (64, 64) if args.quick else (512, 256)

    print("## Memory codecs\n")
    command = " ".join(["python bench/memory_codecs.py", *sys.argv[1:]])
    print(f"`{command}` (torch {torch.__version__}, faiss {faiss.__version__})\n")
    sections = [
        (
            "paper-2.4b, structured synthetic",
            paper,
            structured_memories(n_paper_train, paper_shape, seed=1),
            structured_memories(n_paper_test, paper_shape, seed=2),
        ),
        (
            "demo (small), structured synthetic",
            demo,
            structured_memories(n_demo_train, demo_shape, seed=1),
            structured_memories(n_demo_test, demo_shape, seed=2),
        ),
        (
            "demo (small), random-init model KV",
            demo,
            model_memories(demo, n_demo_train, seed=1),
            model_memories(demo, n_demo_test, seed=2),
        ),
    ]
    for title, cfg, train, test in sections:
        print("\n".join(bench_shape(title, cfg, train, test, args)), flush=True)


if __name__ == "__main__":
    main()
