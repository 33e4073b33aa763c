"""Model benchmark: every number is a ratio against a baseline measured in the same process.

    python bench/model.py                                   # small, float32, this CPU
    python bench/model.py --device cuda --preset paper-2.4b --dtype bfloat16 --flex

Sections (markdown on stdout), each timing its runs interleaved with its baseline:
  1. baseline    large square matmul in the run's dtype: the achievable FLOP rate
  2. encode      encode_references throughput (refs/s, tokens/s) and its FLOP rate / baseline
  3. forward     plain forward vs memory forward of the same context (time overhead), with
                 --flex also through FlexAttention; the memory read's share of the useful
                 FLOPs, as in the paper's 0.23 %
  4. decode      the paper's Table 21 setting (128 prompt + 128 generated tokens, greedy, KV
                 cache) without and with memories (swapped every chunk; retrieval excluded)

Weights are random: speed does not depend on them. FLOPs are the useful ones (attended keys
only), counted analytically; the masked kernels do more work than that, which is the point.
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from model import Memory3, ModelConfig, encode_references, generate  # noqa: E402

SETTINGS = {  # per device: sizes that take seconds, not minutes
    "cpu": dict(matmul=2048, enc_batch=64, fwd_batch=4, fwd_lens=(256, 512), dec_batch=8),
    "cuda": dict(matmul=8192, enc_batch=256, fwd_batch=4, fwd_lens=(256, 2048), dec_batch=32),
}


CLOCK = time.perf_counter  # --clock process: this process's CPU time (shared CPU, 1 thread)


def timed(fns: dict, device: str, repeats: int) -> dict:
    """Median time of each fn, after a warm-up call of each. The fns run interleaved
    (a, b, a, b, ...) so that a load change on a shared machine hits all of them alike."""

    def once(fn):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = CLOCK()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        return CLOCK() - t0

    for fn in fns.values():
        fn()
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            times[name].append(once(fn))
    return {name: statistics.median(ts) for name, ts in times.items()}


# -- useful FLOPs (multiply-add = 2) ----------------------------------------------------------


def linear_flops_per_token(cfg: ModelConfig) -> int:
    qkv = cfg.d_model * (cfg.n_heads + 2 * cfg.n_kv_heads) * cfg.head_dim
    return 2 * (qkv + cfg.n_heads * cfg.head_dim * cfg.d_model + 3 * cfg.d_model * cfg.mlp_hidden)


def attn_flops(cfg: ModelConfig, n_queries_keys: float) -> float:
    """QK^T and AV over all query heads for n (query, key) pairs."""
    return 4 * cfg.n_heads * cfg.head_dim * n_queries_keys


def encode_flops(cfg: ModelConfig, ref_len: int) -> float:
    """One reference: L_mem layers of projections and selection scores, L_mem - 1 of the rest."""
    S = ref_len + 1
    qkv = 2 * S * cfg.d_model * (cfg.n_heads + 2 * cfg.n_kv_heads) * cfg.head_dim
    rest = S * (linear_flops_per_token(cfg) - qkv / S) + attn_flops(cfg, S * (S + 1) / 2)
    score = 2 * cfg.n_heads * cfg.head_dim * S * S
    return cfg.n_mem_layers * (qkv + score) + (cfg.n_mem_layers - 1) * rest


def forward_flops(cfg: ModelConfig, T: int, mem_keys_per_query: int) -> tuple[float, float]:
    """(total, memory read) for one sequence of T tokens (+ the sink when reading memory)."""
    n = T + (mem_keys_per_query > 0)
    total = cfg.n_layers * (n * linear_flops_per_token(cfg) + attn_flops(cfg, n * (n + 1) / 2))
    total += 2 * T * cfg.d_model * cfg.vocab_size
    read = cfg.n_mem_layers * attn_flops(cfg, T * mem_keys_per_query)
    return total + read, read


# -- sections ---------------------------------------------------------------------------------


def matmul(n, device, dtype):
    """The baseline: one n x n x n matmul; returns (fn, its FLOPs)."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    return (lambda: a @ b), 2 * n**3


def random_memories(cfg, B, C, device, dtype, gen):
    shape = (B, C, cfg.mems_per_chunk, cfg.n_mem_layers, 2, cfg.n_kv_heads, cfg.mem_top_k, cfg.head_dim)
    return torch.randn(shape, generator=gen, device=device).to(dtype)


def bench_encode(model, cfg, run):
    """Full-length references, the paper's top-8."""
    B, T = run.settings["enc_batch"], cfg.ref_max_tokens
    refs = torch.randint(4, cfg.vocab_size, (B, T), device=run.device, generator=run.gen)
    t = timed({"mm": run.matmul, "enc": lambda: encode_references(model, refs)}, run.device, run.repeats)
    peak, rate = run.matmul_flops / t["mm"], B * encode_flops(cfg, T) / t["enc"]
    print("| encode_references | value |\n|---|---|")
    print(f"| baseline: {run.settings['matmul']}³ matmul, {run.dtype_name} | {peak / 1e9:,.1f} GFLOP/s |")
    print(f"| batch | {B} refs × {T} tokens, top-{cfg.mem_top_k} |")
    print(f"| throughput | {B / t['enc']:,.1f} refs/s, {B * T / t['enc']:,.0f} tokens/s |")
    print(f"| achieved / matmul FLOP rate | {rate / peak:.1%} ({rate / 1e9:,.1f} GFLOP/s) |")


def bench_forward(model, cfg, run):
    """Plain vs memory forward of the same context; every chunk reads mems_per_chunk memories.
    With --flex, also the memory layers through compiled FlexAttention (model/flex.py)."""
    flex_cols = " | with memory, flex | flex overhead" if run.flex else ""
    print(
        f"| forward (B × T) | plain | with memory | time overhead{flex_cols} "
        f"| memory read FLOPs share | plain FLOP rate / matmul |"
    )
    print("|---" * (6 + 2 * run.flex) + "|")
    B = run.settings["fwd_batch"]
    for T in [T for T in run.settings["fwd_lens"] if T <= cfg.max_seq_len]:
        tokens = torch.randint(4, cfg.vocab_size, (B, T), device=run.device, generator=run.gen)
        tokens[:, 0] = cfg.bos_id
        C = -(-T // cfg.mem_chunk_size)
        memories = random_memories(cfg, B, C, run.device, run.dtype, run.gen)
        fns = {"mm": run.matmul, "plain": lambda: model(tokens), "mem": lambda: model(tokens, memories)}
        if run.flex:
            fns["flex"] = lambda: with_flex(model, lambda: model(tokens, memories))
        t = timed(fns, run.device, run.repeats)
        total, read = forward_flops(cfg, T, cfg.mems_per_chunk * cfg.mem_top_k)
        plain_total, _ = forward_flops(cfg, T, 0)
        mfu = B * plain_total / t["plain"] / (run.matmul_flops / t["mm"])
        flex = f" | {t['flex'] * 1e3:,.1f} ms | {t['flex'] / t['plain'] - 1:+.1%}" if run.flex else ""
        print(
            f"| {B} × {T} ({C} chunks × {cfg.mems_per_chunk} memories) | "
            f"{t['plain'] * 1e3:,.1f} ms | {t['mem'] * 1e3:,.1f} ms | "
            f"{t['mem'] / t['plain'] - 1:+.1%}{flex} | {read / total:.2%} | {mfu:.1%} |"
        )


def with_flex(model, fn):
    model.use_flex = True
    try:
        return fn()
    finally:
        model.use_flex = False


def bench_decode(model, cfg, run):
    """The paper's Table 21 setting; the memories are already in device memory, so this
    measures the model's share of the slowdown, not retrieval or loading."""
    B, n_in, n_out = run.settings["dec_batch"], 128, 128
    prompt = torch.randint(4, cfg.vocab_size, (B, n_in), device=run.device, generator=run.gen)
    block = random_memories(cfg, B, 1, run.device, run.dtype, run.gen)[:, 0]
    retrieve = lambda query: (block, None)  # noqa: E731
    t = timed(
        {
            "plain": lambda: generate(model, prompt, n_out),
            "mem": lambda: generate(model, prompt, n_out, retrieve=retrieve),
        },
        run.device,
        max(run.repeats // 2, 1),
    )
    print("| decode, batch × (in + out), greedy, KV cache | plain | with memory | slowdown |")
    print("|---|---|---|---|")
    print(
        f"| {B} × ({n_in} + {n_out}) | {B * n_out / t['plain']:,.0f} tok/s | "
        f"{B * n_out / t['mem']:,.0f} tok/s | {1 - t['plain'] / t['mem']:.1%} |"
    )
    print(
        "\nthroughput = batch × generated tokens / time, as in the paper's Table 21 "
        "(there: A800, 1131 vs 733 tok/s, 35 % slower, mostly loading memories from drive)."
    )


class Run:
    def __init__(self, args):
        self.device, self.dtype_name, self.repeats = args.device, args.dtype, args.repeats
        self.dtype = getattr(torch, args.dtype)
        self.flex = args.flex
        self.settings = SETTINGS[args.device]
        self.gen = torch.Generator(device=args.device).manual_seed(0)
        self.matmul, self.matmul_flops = matmul(self.settings["matmul"], self.device, self.dtype)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--preset", default="small")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--flex", action="store_true", help="also time the memory layers through compiled FlexAttention"
    )
    parser.add_argument(
        "--clock",
        default="wall",
        choices=["wall", "process"],
        help="process: CPU time of this process, steadier on a shared machine "
        "(use with --threads 1; spinning threads would count)",
    )
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    args = parser.parse_args()
    global CLOCK
    if args.clock == "process":
        CLOCK = time.process_time
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)
    torch.manual_seed(0)
    cfg = ModelConfig.from_preset(args.preset)
    with torch.device(args.device):
        model = Memory3(cfg).to(getattr(torch, args.dtype)).eval()
    run = Run(args)

    hw = torch.cuda.get_device_name() if args.device == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    print(f"## bench/model.py: `{args.preset}` in {args.dtype} on {hw}\n")
    print(
        f"torch {torch.__version__}; {model.num_params() / 1e6:,.1f}M non-embedding parameters; "
        f"median of {args.repeats} runs after a warm-up, interleaved with their baseline; "
        f"{args.clock} clock\n"
    )
    for section in (bench_encode, bench_forward, bench_decode):
        try:  # one failing section (e.g. out of memory) must not lose the others
            section(model, cfg, run)
        except Exception as e:  # noqa: BLE001
            print(f"\n{section.__name__} failed: `{type(e).__name__}: {str(e)[:300]}`")
        print()
    if args.device == "cuda":
        print(f"peak GPU memory: {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")


if __name__ == "__main__":
    main()
