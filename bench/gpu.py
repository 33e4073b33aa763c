"""Issue 30's device bench: every figure beside its bound, both measured in this same run.

    bench/gpu.sh --device cuda --out bench/results/gpu.json   # paper-2.4b, bfloat16: < 8 min, H200
    bench/gpu.sh --device cpu --out /tmp/gpu-cpu.json         # dry run: tiny preset, float32, seconds

Bounds, measured here rather than read from a data sheet:
- memory bandwidth: a large device-to-device tensor copy (bytes read + written / time);
- matmul rate: one n x n x n matmul in the run's dtype;
- decode: the weight-read bound, batch x bandwidth / bytes of weights a step reads (every
  matrix but the input embedding, of which a step gathers B rows). No decode step of this batch
  is faster than reading the weights once;
- memory forward: the same forward without memory (overhead = with / without - 1);
- encoding: matmul rate / useful FLOPs per reference (bench/model.encode_flops).

Figures: decode tok/s without memory, with memory (a swap every chunk, synthetic retrieval from
a host pool as in bench/decode.py --synthetic) and RAG, each through the eager path and the
static one (model/static_decode.py, a CUDA graph on CUDA; on CPU the same step eagerly, and the
output says so); the memory forward at B x T for the dense mask, FlexAttention and chunk-local
attention; reference encoding (top-k, and dense to show the score's cost). Then the issue's
goals, met or not. Weights are random: speed does not depend on them.

The JSON at --out is rewritten after every section, so a run cut short keeps what it measured.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see bench/decode.py: before torch loads

import torch  # noqa: E402

import model.flex as flex  # noqa: E402
from bench.decode import Replay, SyntheticRetriever  # noqa: E402
from bench.model import encode_flops, matmul, random_memories  # noqa: E402
from model import Memory3, ModelConfig, encode_references  # noqa: E402
from model.generation import generate_with_memory  # noqa: E402
from model.static_decode import StaticDecoder  # noqa: E402

SHAPES = {  # cuda: the shapes; cpu: the same sections, small enough for the test suite
    "cuda": dict(
        preset="paper-2.4b",
        dtype="bfloat16",
        copy_mib=4096,
        matmul=8192,
        enc_batch=256,
        fwd=(4, 2048),
        dec=(32, 128, 128),
        repeats=5,
        dec_repeats=3,
        budget_s=420,
    ),
    "cpu": dict(
        preset="tiny",
        dtype="float32",
        copy_mib=64,
        matmul=256,
        enc_batch=16,
        fwd=(2, 64),
        dec=(2, 16, 32),
        repeats=3,
        dec_repeats=2,
        budget_s=120,
    ),
}
# H200, paper-2.4b, bfloat16 (issue 30)
GOALS = dict(
    decode_of_bound=0.40, memory_slowdown=0.05, memory_over_rag=2.0, forward_overhead=0.10, encode_of_matmul=0.60
)


class Run:
    def __init__(self, args):
        self.device = args.device
        self.shape = dict(SHAPES[args.device])
        for key in ("preset", "dtype", "repeats"):
            if getattr(args, key) is not None:
                self.shape[key] = getattr(args, key)
        if args.repeats is not None:
            self.shape["dec_repeats"] = args.repeats
        self.dtype = getattr(torch, self.shape["dtype"])
        self.cuda = args.device == "cuda"
        self.out = Path(args.out) if args.out else None
        self.t0 = time.perf_counter()
        # process CPU time: steadier than the wall clock on cores shared with other jobs (1 thread)
        self.clock = time.process_time if args.clock == "process" else time.perf_counter
        self.figures: list[dict] = []
        self.goals: list[dict] = []
        self.info: dict = {}

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize()

    def timed(self, fns: dict, repeats: int, warm_up: bool = True) -> dict:
        """Median seconds of each fn after one warm-up call of each, interleaved (a, b, a, b...)
        so that a load change on a shared machine hits them alike."""
        for fn in fns.values() if warm_up else ():
            fn()
        times = {name: [] for name in fns}
        for _ in range(repeats):
            for name, fn in fns.items():
                self.sync()
                t = self.clock()
                fn()
                self.sync()
                times[name].append(self.clock() - t)
        return {name: statistics.median(ts) for name, ts in times.items()}

    def figure(self, section, name, value, unit, bound, bound_name, *, higher_is_better=True, note="", **checks):
        """value against its bound; the fraction is value / bound for a rate, bound / value for
        a time (both: how close to the bound, 1 = at it)."""
        frac = None
        if value is not None and bound:
            frac = value / bound if higher_is_better else bound / value
        self.figures.append(
            dict(
                section=section,
                name=name,
                value=value,
                unit=unit,
                bound=bound,
                bound_name=bound_name,
                fraction=frac,
                note=note,
                **checks,
            )
        )

    def goal(self, name, value, target, met, note=""):
        self.goals.append(dict(goal=name, value=value, target=target, met=bool(met), note=note))

    def save(self):
        if self.out:
            self.out.parent.mkdir(parents=True, exist_ok=True)
            data = dict(info=self.info, figures=self.figures, goals=self.goals, elapsed_s=time.perf_counter() - self.t0)
            self.out.write_text(json.dumps(data, indent=1) + "\n")


# -- bounds -----------------------------------------------------------------------------------


def bench_bounds(run, model):
    n = run.shape["copy_mib"] * 2**20 // 4  # float32 elements: the copy moves bytes, not values
    src = torch.ones(n, device=run.device)
    dst = torch.empty_like(src)
    t = run.timed({"copy": lambda: dst.copy_(src)}, run.shape["repeats"])["copy"]  # noqa: F821 - deleted after
    run.bandwidth = 2 * src.numel() * src.element_size() / t  # read + write
    del src, dst
    run.figure(
        "bounds",
        f"memory bandwidth, {run.shape['copy_mib']} MiB copy",
        run.bandwidth / 1e9,
        "GB/s",
        None,
        "",
        note="read + written bytes / time; the decode bound's denominator",
    )
    mm, flops = matmul(run.shape["matmul"], run.device, run.dtype)
    t = run.timed({"mm": mm}, run.shape["repeats"])["mm"]
    run.matmul_rate = flops / t
    run.figure(
        "bounds",
        f"matmul rate, {run.shape['matmul']}³ {run.shape['dtype']}",
        run.matmul_rate / 1e12,
        "TFLOP/s",
        None,
        "",
        note="the encoding bound's numerator",
    )
    # a decode step reads every weight matrix once; of the input embedding only B rows
    run.weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    if model.lm_head is not None:
        run.weight_bytes -= model.tok_emb.weight.numel() * model.tok_emb.weight.element_size()
    run.figure("bounds", "weights read per decode step", run.weight_bytes / 1e9, "GB", None, "")


# -- decode -----------------------------------------------------------------------------------


def bench_decode(run, model, cfg):
    B, n_in, n_out = run.shape["dec"]
    g = torch.Generator().manual_seed(1)
    prompt = torch.randint(4, cfg.vocab_size, (B, n_in), generator=g).to(run.device)
    refs = torch.randint(4, cfg.vocab_size, (B, cfg.mems_per_chunk * cfg.ref_max_tokens), generator=g)
    rag_prompt = torch.cat([refs.to(run.device), prompt], dim=1)
    # the same memories for the same query on every path, so their outputs can be compared
    retrieve = Replay(SyntheticRetriever(cfg, 1024, cfg.mems_per_chunk, run.dtype))
    modes = {
        "none": (prompt, {}),
        "memory": (prompt, dict(retrieve=retrieve, prefetch=run.cuda)),
        "rag": (rag_prompt, {}),
    }
    bound = B * run.bandwidth / run.weight_bytes
    static_name = "static, CUDA graph" if run.cuda else "static, eager"
    fns, equal, capture = {}, {}, {}
    for mode, (p, kw) in modes.items():
        decoder = StaticDecoder(model, B, p.shape[1] + n_out, with_memory="retrieve" in kw)
        eager = generate_with_memory(model, p, n_out, **kw).tokens
        run.sync()
        t = time.perf_counter()
        static = generate_with_memory(model, p, n_out, static=decoder, **kw).tokens  # captures
        run.sync()
        capture[mode] = time.perf_counter() - t
        equal[mode] = (eager == static).all(dim=1).float().mean().item()
        fns[(mode, "eager")] = lambda p=p, kw=kw: generate_with_memory(model, p, n_out, **kw)
        fns[(mode, static_name)] = lambda p=p, kw=kw, d=decoder: generate_with_memory(model, p, n_out, static=d, **kw)
    t = run.timed(fns, run.shape["dec_repeats"], warm_up=False)  # the calls above warmed up
    tok = {key: B * n_out / s for key, s in t.items()}
    where = f"batch {B}, {n_in} in + {n_out} out, prefill included"
    for (mode, path), rate in tok.items():
        note = where
        if path != "eager":
            note += (
                f"; greedy rows equal to eager: {equal[mode]:.0%}; first call "
                f"{capture[mode]:.2f} s (graph capture included)"
                if run.cuda
                else f"; greedy rows equal to eager: {equal[mode]:.0%}; CUDA graphs: not measurable "
                f"on {run.device} (they need a CUDA device), the static step ran eagerly"
            )
        checks = {} if path == "eager" else dict(rows_equal_to_eager=equal[mode])
        run.figure("decode", f"{mode}, {path}", rate, "tok/s", bound, "weight-read bound tok/s", note=note, **checks)
    for mode in modes:
        ratio = tok[(mode, static_name)] / tok[(mode, "eager")]
        run.figure(
            "decode",
            f"{mode}: static / eager speed",
            ratio,
            "×",
            None,
            "",
            note="the static path becomes the default only if equal and not slower",
        )
    best = {m: max(tok[(m, "eager")], tok[(m, static_name)]) for m in modes}
    path_of = {m: "eager" if best[m] == tok[(m, "eager")] else static_name for m in modes}
    run.goal(
        "decode with memory / weight-read bound",
        best["memory"] / bound,
        GOALS["decode_of_bound"],
        best["memory"] / bound >= GOALS["decode_of_bound"],
        f"{path_of['memory']} path",
    )
    slow = 1 - best["memory"] / best["none"]
    run.goal(
        "decode slowdown, memory vs none",
        slow,
        GOALS["memory_slowdown"],
        slow <= GOALS["memory_slowdown"],
        f"best paths: {path_of['memory']} / {path_of['none']}",
    )
    over = best["memory"] / best["rag"]
    run.goal(
        "decode speed, memory / RAG",
        over,
        GOALS["memory_over_rag"],
        over >= GOALS["memory_over_rag"],
        f"best paths: {path_of['memory']} / {path_of['rag']}",
    )


# -- memory forward ---------------------------------------------------------------------------


def bench_forward(run, model, cfg):
    B, T = run.shape["fwd"]
    g = torch.Generator(device=run.device).manual_seed(2)
    tokens = torch.randint(4, cfg.vocab_size, (B, T), device=run.device, generator=g)
    tokens[:, 0] = cfg.bos_id
    C = -(-T // cfg.mem_chunk_size)
    memories = random_memories(cfg, B, C, run.device, run.dtype, g)
    # on CPU FlexAttention runs uncompiled (it materialises the scores): correct, not fast
    flex.COMPILE = run.cuda
    warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")

    def with_memory(use_flex, chunk_local):
        def fn():
            model.use_flex, model.chunk_local = use_flex, chunk_local
            try:
                return model(tokens, memories)
            finally:
                model.use_flex, model.chunk_local = False, True

        return fn

    paths = {
        "dense mask": with_memory(False, False),
        "FlexAttention": with_memory(True, False),
        "chunk-local": with_memory(False, True),
    }
    outs = {name: fn() for name, fn in paths.items()}
    ref = outs["dense mask"].float()
    t = run.timed({"plain": lambda: model(tokens), **paths}, run.shape["repeats"])
    shape = f"{B} × {T}, {C} chunks × {cfg.mems_per_chunk} memories × top-{cfg.mem_top_k}"
    run.figure(
        "memory forward",
        f"no memory, {B} × {T}",
        t["plain"] * 1e3,
        "ms",
        t["plain"] * 1e3,
        "itself",
        higher_is_better=False,
        note="the bound of the rows below",
    )
    overheads = {}
    for name in paths:
        overheads[name] = t[name] / t["plain"] - 1
        diff = (outs[name].float() - ref).abs().max().item()
        note = f"{shape}; overhead {overheads[name]:+.1%}; largest logit difference to the dense mask's {diff:.2g}"
        if name == "FlexAttention" and not run.cuda:
            note += f"; uncompiled on {run.device} (not representative)"
        run.figure(
            "memory forward",
            f"with memory, {name}",
            t[name] * 1e3,
            "ms",
            t["plain"] * 1e3,
            "no-memory forward ms",
            higher_is_better=False,
            note=note,
            max_logit_diff=diff,
        )
    best = min(overheads, key=overheads.get)
    run.goal(
        f"memory forward overhead at {B} × {T}",
        overheads[best],
        GOALS["forward_overhead"],
        overheads[best] <= GOALS["forward_overhead"],
        f"best path: {best}; chunk-local "
        f"{overheads['chunk-local']:+.1%}, Flex {overheads['FlexAttention']:+.1%}, dense "
        f"{overheads['dense mask']:+.1%}",
    )


# -- reference encoding -----------------------------------------------------------------------


def dense_encode_flops(cfg, T):
    """encode_flops without the top-k score, and without the last memory layer's query
    projection (keep-all skips both: model/memory.py)."""
    S = T + 1
    score = cfg.n_mem_layers * 2 * cfg.n_heads * cfg.head_dim * S * S
    return encode_flops(cfg, T) - score - 2 * S * cfg.d_model * cfg.n_heads * cfg.head_dim


def bench_encode(run, model, cfg):
    n, T = run.shape["enc_batch"], cfg.ref_max_tokens
    g = torch.Generator(device=run.device).manual_seed(3)
    refs = torch.randint(4, cfg.vocab_size, (n, T), device=run.device, generator=g)
    t = run.timed(
        {"top-k": lambda: encode_references(model, refs), "dense": lambda: encode_references(model, refs, top_k=T)},
        run.shape["repeats"],
    )
    for name, flops in (("top-k", encode_flops(cfg, T)), ("dense", dense_encode_flops(cfg, T))):
        label = f"top-{cfg.mem_top_k}" if name == "top-k" else "dense (no score)"
        run.figure(
            "encoding",
            f"references, {label}",
            n / t[name],
            "refs/s",
            run.matmul_rate / flops,
            "matmul-rate refs/s",
            note=f"{n} refs × {T} tokens; {flops / 1e9:.3g} GFLOP per reference",
        )
    frac = n / t["top-k"] * encode_flops(cfg, T) / run.matmul_rate
    run.goal(
        "reference encoding / matmul rate",
        frac,
        GOALS["encode_of_matmul"],
        frac >= GOALS["encode_of_matmul"],
        f"top-{cfg.mem_top_k}; score share of the time {1 - t['dense'] / t['top-k']:.0%}",
    )


# -- output -----------------------------------------------------------------------------------


def fmt(x, unit=""):
    if x is None:
        return "–"
    if unit == "×" or abs(x) < 10:
        return f"{x:,.3g}"
    return f"{x:,.0f}" if abs(x) >= 100 else f"{x:,.1f}"


def print_tables(run):
    print("| section | figure | value | bound | of bound | note |\n|---|---|---|---|---|---|")
    for f in run.figures:
        bound = f"{fmt(f['bound'])} {f['bound_name']}" if f["bound"] else "–"
        frac = f"{f['fraction']:.1%}" if f["fraction"] is not None else "–"
        print(
            f"| {f['section']} | {f['name']} | {fmt(f['value'], f['unit'])} {f['unit']} | {bound} "
            f"| {frac} | {f['note']} |"
        )
    print("\n| goal (H200, paper-2.4b, bf16) | measured | target | met | note |\n|---|---|---|---|---|")
    for g in run.goals:
        print(f"| {g['goal']} | {g['value']:.3g} | {g['target']:g} | {'yes' if g['met'] else 'no'} | {g['note']} |")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=sorted(SHAPES))
    p.add_argument("--out", help="write the figures as JSON here")
    p.add_argument("--preset", help="model preset (default: paper-2.4b on cuda, tiny on cpu)")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), help="default: bfloat16 on cuda")
    p.add_argument("--repeats", type=int)
    p.add_argument("--threads", type=int, default=1, help="CPU threads (cpu runs)")
    p.add_argument(
        "--clock",
        default="wall",
        choices=("wall", "process"),
        help="process: this process's CPU time (a shared CPU, --threads 1)",
    )
    p.add_argument("--sections", default="decode,forward,encode")
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch sees no CUDA device")
    if args.device == "cpu":
        torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)
    run = Run(args)
    cfg = ModelConfig.from_preset(run.shape["preset"])
    torch.manual_seed(0)
    with torch.device(run.device):
        model = Memory3(cfg).to(run.dtype).eval()
    hw = torch.cuda.get_device_name() if run.cuda else f"CPU {platform.machine()}, {torch.get_num_threads()} thread(s)"
    run.info = dict(
        device=hw,
        torch=torch.__version__,
        preset=run.shape["preset"],
        dtype=run.shape["dtype"],
        non_embedding_params=model.num_params(),
        shapes=run.shape,
        clock=args.clock,
    )
    print(
        f"## bench/gpu.py: `{run.shape['preset']}` ({model.num_params() / 1e6:,.1f}M non-embedding "
        f"parameters) in {run.shape['dtype']} on {hw}, torch {torch.__version__}; medians of "
        f"{run.shape['repeats']} runs ({run.shape['dec_repeats']} for decode), {args.clock} clock\n"
    )
    sections = {"decode": bench_decode, "forward": bench_forward, "encode": bench_encode}
    bench_bounds(run, model)
    run.save()
    for name in args.sections.split(","):
        elapsed = time.perf_counter() - run.t0
        if elapsed > run.shape["budget_s"]:
            print(f"{name}: skipped, {elapsed:.0f} s spent of a {run.shape['budget_s']} s budget")
            continue
        t = time.perf_counter()
        try:  # one failing section (out of memory, a kernel that will not compile) keeps the others
            sections[name](run, model, cfg)
        except Exception as e:  # noqa: BLE001
            print(f"{name} failed, not measured: `{type(e).__name__}: {str(e)[:300]}`")
            run.info.setdefault("failed", {})[name] = f"{type(e).__name__}: {str(e)[:300]}"
        print(f"{name}: {time.perf_counter() - t:.1f} s", file=sys.stderr)
        run.save()
    if run.cuda:
        run.info["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
    else:
        run.info["peak_memory_gib"] = f"not measurable on {run.device}"
    run.save()
    print_tables(run)
    print(
        f"\npeak device memory: {fmt(run.info['peak_memory_gib']) if run.cuda else run.info['peak_memory_gib']}"
        f"{' GiB' if run.cuda else ''}; elapsed {time.perf_counter() - run.t0:.0f} s"
    )
    return 1 if run.info.get("failed") else 0


if __name__ == "__main__":
    sys.exit(main())
