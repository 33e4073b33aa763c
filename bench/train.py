"""Training-step benchmark (issue 5): warmup vs continual step on real bank data, in one process.

    python bench/train.py --bank /tmp/train-bank              # small preset, float32, this CPU

Measures, interleaved (matmul, warmup, continual-dense, continual-sparse, ... ; median of
--repeats after one warm-up call each):
  - a square matmul: the achievable FLOP rate of this process
  - a warmup step: forward + backward + AdamW on micro_batch sequences, no memory
  - a continual step: the same plus the real-time encoding of every chunk's neighbor reference
    (with gradients) and memory attention over own + previous 4 chunks' references; dense
    (all reference tokens) and sparse (model's top-k)
and prints tokens/s, the continual/warmup time ratio (paper: a bit over 2x) and the achieved
FLOP rate (useful FLOPs counted analytically, 3x forward for forward + backward) against the matmul.

The step is the same code jobs/training/trainer.py runs (model.train_step) with torch's AdamW, without
DeepSpeed or Ray: one process has nothing to shard, and their overhead is not the step's cost.
The bank needs train_sequences, refs and neighbors (`m3 ingest`, `m3 embed`, `m3 pair`).
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from model import Memory3, ModelConfig  # noqa: E402
from model.train_step import continual_memories, lm_loss  # noqa: E402

CLOCKS = {"wall": time.perf_counter, "process": time.process_time}


def linear_flops(cfg: ModelConfig, layers: int, lm_head: bool) -> int:
    """Forward FLOPs per token of the weight matmuls of `layers` blocks (2 per MAC)."""
    d, hd = cfg.d_model, cfg.head_dim
    attn = d * (cfg.n_heads + 2 * cfg.n_kv_heads) * hd + cfg.n_heads * hd * d
    mlp = 3 * d * cfg.mlp_hidden
    return 2 * (layers * (attn + mlp) + (d * cfg.vocab_size if lm_head else 0))


def step_flops(cfg: ModelConfig, B: int, S: int, refs: int = 0, T_ref: int = 0, pool: int = 0) -> float:
    """Useful FLOPs of forward + backward (3x forward): context through every layer with causal
    attention, plus refs references of T_ref tokens through the memory layers (the last one only
    its qkv) and every context token reading `pool` memory keys in each memory layer."""
    attn_ctx = 2 * 2 * cfg.n_heads * cfg.head_dim * (S + 1) / 2  # QK and PV, causal half
    fwd = B * S * (linear_flops(cfg, cfg.n_layers, True) + cfg.n_layers * attn_ctx)
    if refs:
        qkv = 2 * cfg.d_model * (cfg.n_heads + 2 * cfg.n_kv_heads) * cfg.head_dim
        enc_tok = linear_flops(cfg, cfg.n_mem_layers - 1, False) + qkv
        enc_attn = (cfg.n_mem_layers - 1) * 2 * 2 * cfg.n_heads * cfg.head_dim * (T_ref + 1) / 2
        score = cfg.n_mem_layers * 2 * cfg.n_heads * cfg.head_dim * (T_ref + 1)  # q.k for top-k scores
        fwd += refs * (T_ref + 1) * (enc_tok + enc_attn + score)
        fwd += B * S * cfg.n_mem_layers * 2 * 2 * cfg.n_heads * cfg.head_dim * pool
    return 3 * fwd


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--bank", help="a bank with train_sequences and refs (real data)")
    p.add_argument(
        "--synthetic",
        action="store_true",
        help="random tokens instead of a bank: for a GPU machine, where Lance is not installed",
    )
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument(
        "--layers", type=int, default=None, help="a slice of the preset: this many blocks, the first half memory layers"
    )
    p.add_argument("--matmul-n", type=int, default=1024)
    p.add_argument("--preset", default="small")
    p.add_argument("--seq", type=int, default=512, help="context tokens per sequence")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--clock", choices=CLOCKS, default="process")
    p.add_argument("--out", default=None, help="also write the markdown to this file")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    if a.device == "cuda":
        a.clock = "wall"  # process time does not see the GPU; every timed call synchronizes
    clock = CLOCKS[a.clock]
    dev, dtype = torch.device(a.device), getattr(torch, a.dtype)
    sizes = {"vocab_size": 8192} if a.preset != "paper-2.4b" else {}
    if a.layers:
        sizes.update(n_layers=a.layers, n_mem_layers=max(1, a.layers // 2))
    cfg = ModelConfig.from_preset(a.preset, **sizes)
    torch.manual_seed(0)
    if a.synthetic:
        C = -(-a.seq // cfg.mem_chunk_size)
        tokens = torch.randint(4, cfg.vocab_size, (a.batch, a.seq))
        refs = torch.randint(4, cfg.vocab_size, (a.batch, C, cfg.ref_max_tokens))
        valid = torch.ones(a.batch, C, dtype=torch.bool)
    else:
        from pipelines.train_data import ShardReader
        from storage.bank import Bank

        if not a.bank:
            p.error("--bank is required unless --synthetic")
        bank = Bank(a.bank)
        bank.require("train_sequences", "refs", "neighbors")
        batch = ShardReader(
            bank,
            micro_batch=a.batch,
            neighbors=True,
            chunk_size=cfg.mem_chunk_size,
            max_tokens=a.seq,
            pad_id=cfg.pad_id,
        ).batch(0)
        tokens, refs, valid = batch["tokens"], batch["ref_tokens"], batch["ref_valid"]
    tokens, refs, valid = tokens.to(dev), refs.to(dev), valid.to(dev)
    model = Memory3(cfg).to(device=dev, dtype=dtype).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1)
    B, C, T_ref = refs.shape
    n = a.matmul_n
    x, y = torch.randn(n, n, device=dev, dtype=dtype), torch.randn(n, n, device=dev, dtype=dtype)

    def step(memory: bool, sparsify: bool):
        mem = mask = None
        if memory:
            mem, mask = continual_memories(model, refs, valid, window=5, sparsify=sparsify, grad_through_refs=True)
        opt.zero_grad(set_to_none=True)
        lm_loss(model, tokens, mem, mask).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()

    fns = {
        "matmul": lambda: x @ y,
        "warmup": lambda: step(False, False),
        "continual dense": lambda: step(True, False),
        "continual sparse": lambda: step(True, True),
    }
    times = {k: [] for k in fns}
    sync = torch.cuda.synchronize if a.device == "cuda" else (lambda: None)
    for r in range(a.repeats + 1):
        for k, fn in fns.items():
            sync()
            t = clock()
            fn()
            sync()
            if r:  # the first round warms up
                times[k].append(clock() - t)
    med = {k: statistics.median(v) for k, v in times.items()}
    peak = 2 * n**3 / med["matmul"]
    hits = int(valid.sum())
    flops = {
        "warmup": step_flops(cfg, B, a.seq),
        "continual dense": step_flops(cfg, B, a.seq, B * C, T_ref, 5 * T_ref),
        "continual sparse": step_flops(cfg, B, a.seq, B * C, T_ref, 5 * cfg.mem_top_k),
    }
    where = torch.cuda.get_device_name() if a.device == "cuda" else f"CPU, {a.threads} thread(s)"
    shape = f"{cfg.n_layers} layers ({cfg.n_mem_layers} memory)"
    lines = [
        f"## `{a.preset}` preset, {shape}, {a.dtype}, {B} x {a.seq} tokens, {where}, {a.clock} clock",
        "",
        f"{hits}/{B * C} chunks with a neighbor; references padded to {T_ref} tokens; "
        f"matmul {n}x{n} {a.dtype}: {peak / 1e9:.1f} GFLOP/s",
        "",
        "| step | median s | tokens/s | x warmup time | useful GFLOP | GFLOP/s | of matmul |",
        "|---|---|---|---|---|---|---|",
    ]
    for k in ("warmup", "continual dense", "continual sparse"):
        rate = flops[k] / med[k]
        lines.append(
            f"| {k} | {med[k]:.3f} | {B * a.seq / med[k]:,.0f} | {med[k] / med['warmup']:.2f} | "
            f"{flops[k] / 1e9:.1f} | {rate / 1e9:.1f} | {rate / peak:.0%} |"
        )
    cmd = "python bench/train.py " + " ".join(sys.argv[1:])
    text = "\n".join(lines) + f"\n\nCommand: `{cmd}` ({time.strftime('%Y-%m-%d')})\n"
    print(text)
    if a.out:
        with Path(a.out).open("a") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
