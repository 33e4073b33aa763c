"""Encode job throughput (references/s) against the model-only encoding rate, same process.

    .venv/bin/m3 ingest -c configs/demo.yaml --set bank.uri=/tmp/fetch-bank   # once, ~30 s
    .venv/bin/python bench/encode.py [--bank /tmp/fetch-bank] [--codec int8] [--refs 1024]
                                     [--repeats 2] [--omp-wait-policy PASSIVE]

The job: `jobs.stages.encode.run_encode` on a fresh copy of the ingested bank per measured run (the job
skips work it has already done), embedded Ray with --cpus CPUs, demo model `small` (its
reproducible untrained start, created once in the template bank so no run pays for it), the
codec of --codec, batch size 32. Two layouts of the same 2 CPUs: 1 actor x 2 threads and
2 actors x 1 thread. --refs N keeps the first N references of the bank (0 = all 11,419) so a
run stays within 5 minutes on a shared 2-core box even when 2 threads per process collapse (see
--omp-wait-policy); the default 1,024 in 2 shards of 512 gives each of 2 actors one shard.

The baseline: `pipelines.encode_step.encode_tokens` (model + codec, no Ray, no I/O) in this
process, on the same references, in the same order (shards of refs_per_shard, sorted by length
inside, as EncodeShards does), same weights, batch size and torch threads.

Two clocks, because other jobs share the 2 cores:
- wall: references / elapsed seconds, the median over --repeats interleaved runs;
- CPU: references / CPU-seconds. For the job, CPU seconds of this driver and every process it
  started (Ray's GCS and raylet, workers, actors), sampled every 0.1 s; for the model-only run,
  this process's CPU time. The job's fraction of the model-only rate is given on both clocks;
  the CPU one is what other jobs on the box do not move (except busy-waiting, see below).

Each measured job also has a small twin (--tiny references, same layout) timed right after it:
its time is the fixed cost of a job (actor start-up: a fresh Python importing torch and loading
the model; Ray Data planning; the commit). The table extrapolates the full bank's rate from the
fixed cost and the marginal rate.

Every config key the job reads is set here (jobs.config.load_config(None, overrides)): the
bench does not read configs/demo.yaml, whose encode section is the demo's to change.

--vs-matmul [--before REV] measures instead (no Ray, no job) the model's encode_references
against a 2048^3 float32 matmul in this process, interleaved, median of --repeats, on this
process's CPU clock with --threads threads (issue 3's definition of the ratio: useful FLOPs, as
bench/model.py counts them, over the matmul's rate): on bench/model.py's input (64 random
references of 128 tokens, the issue-3 figure) and on the first --refs references of the bank in
the job's order and batches (useful FLOPs at each reference's own length, padding not counted).
--before REV also times model/memory.py as it was at git revision REV, in the same process and
on the same inputs, and checks that both keep the same tokens:

    .venv/bin/python bench/encode.py --vs-matmul --threads 1 --repeats 7 --before d394cbb

Ray's start-up is reported, not timed, and a first job on a tiny bank warms the cluster up
(as bench/ingest.py does). --omp-wait-policy sets OMP_WAIT_POLICY before torch is imported here
and before Ray starts (the workers inherit it), so one run measures one policy for both the
baseline and the job.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

ROOT = Path(__file__).resolve().parents[1]
LAYOUTS = ((1, 2), (2, 1))  # (actors, threads per actor): 2 CPUs either way


class CPUMeter:
    """CPU seconds (user + system) of this process and all its descendants while running.

    Processes that exit between two samples lose at most one sampling interval (0.1 s) of CPU;
    the sampling thread's own CPU is subtracted."""

    def __init__(self, interval: float = 0.1):
        import psutil

        self.psutil, self.interval = psutil, interval
        self.me = psutil.Process()
        self.start: dict = {}
        self.last: dict = {}
        self.own = 0.0  # CPU the sampling thread itself spends, not counted
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> dict:
        out = {}
        for p in [self.me, *self.me.children(recursive=True)]:
            try:
                t = p.cpu_times()
                out[(p.pid, p.create_time())] = t.user + t.system
            except self.psutil.Error:
                continue
        return out

    def _run(self):
        while not self._stop.wait(self.interval):
            t0 = time.thread_time()
            self.last.update(self._sample())
            self.own += time.thread_time() - t0

    def __enter__(self):
        self.start = self._sample()
        self.last = dict(self.start)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.last.update(self._sample())

    @property
    def seconds(self) -> float:
        return sum(v - self.start.get(k, 0.0) for k, v in self.last.items()) - self.own


def ensure_bank(src: Path) -> None:
    if (src / "refs.lance").exists():
        return
    print(f"(no bank at {src}: ingesting the demo corpus into it)", flush=True)
    subprocess.run(
        [
            str(ROOT / ".venv" / "bin" / "m3"),
            "ingest",
            "-c",
            str(ROOT / "configs" / "demo.yaml"),
            "--set",
            f"bank.uri={src}",
        ],
        check=True,
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
    )


def subset_bank(src: Path, dst: Path, n: int) -> int:
    """A copy of the ingested bank whose refs table holds its first n references (0 = all)."""
    import lance

    from storage.bank import Bank
    from storage.schemas import REFS

    shutil.copytree(
        src,
        dst,
        ignore=shutil.ignore_patterns(
            "_staging", "_reports", "memories.lance", "embeddings.lance", "models", "quantizers"
        ),
    )
    bank = Bank(str(dst))
    total = bank.dataset("refs").count_rows()
    if n and n < total:
        meta = bank.metadata("refs")
        table = lance.dataset(str(dst / "refs.lance")).to_table(limit=n)
        bank.write("refs", REFS, table.to_batches(), meta)
        return n
    return total


def shard_order(tokens: list, per: int) -> list[list]:
    """The references in EncodeShards' order: shards of `per`, sorted by (length, index) inside."""
    out = []
    for lo in range(0, len(tokens), per):
        shard = tokens[lo : lo + per]
        out.append([shard[i] for i in sorted(range(len(shard)), key=lambda i: (len(shard[i]), i))])
    return out


def model_only(model, codec, shards: list[list], batch: int, threads: int) -> dict:
    import torch

    from pipelines.encode_step import encode_tokens

    torch.set_num_threads(threads)
    n = sum(len(s) for s in shards)
    w, c = time.perf_counter(), time.process_time()
    for toks in shards:
        for lo in range(0, len(toks), batch):
            encode_tokens(model, codec, toks[lo : lo + batch])
    return {"wall": time.perf_counter() - w, "cpu": time.process_time() - c, "n": n}


def memory_module_at(rev: str):
    """model/memory.py as it was at git revision rev, imported beside the current one."""
    import importlib.util

    src = subprocess.run(
        ["git", "show", f"{rev}:model/memory.py"], cwd=ROOT, check=True, capture_output=True, text=True
    ).stdout
    spec = importlib.util.spec_from_loader("model.memory_before", loader=None)
    mod = importlib.util.module_from_spec(spec)
    mod.__package__ = "model"  # its relative imports (.rope) resolve to the current package
    exec(compile(src, f"{rev}:model/memory.py", "exec"), mod.__dict__)
    return mod


def vs_matmul(args, tokens: list, cfg) -> None:
    """encode_references' useful FLOP rate over a same-process matmul's (see the docstring)."""
    import torch

    import model.memory as current
    from bench.model import encode_flops
    from model import Memory3
    from model.ref_batches import MIN_WIDTH, pad_batch

    torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)
    torch.manual_seed(0)
    model = Memory3(cfg).eval()  # random weights: speed does not depend on them
    gen = torch.Generator().manual_seed(0)
    inputs = {
        "bench/model.py input: 64 random refs x 128 tokens": (
            [torch.randint(4, cfg.vocab_size, (64, cfg.ref_max_tokens), generator=gen)],
            64 * encode_flops(cfg, cfg.ref_max_tokens),
            64,
        )
    }
    width = min(MIN_WIDTH, cfg.ref_max_tokens)
    batches = [
        pad_batch(s[lo : lo + args.batch_size], cfg.pad_id, width)
        for s in shard_order(tokens, args.refs_per_shard)
        for lo in range(0, len(s), args.batch_size)
    ]
    inputs[
        f"the bank's first {len(tokens):,} refs ({sum(map(len, tokens)) / len(tokens):.1f} tokens on "
        f"average), batches of {args.batch_size}"
    ] = (batches, sum(encode_flops(cfg, len(t)) for t in tokens), len(tokens))
    versions = {"now": current}
    if args.before:
        versions[f"at {args.before}"] = memory_module_at(args.before)
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    fns = {("matmul", None): lambda: a @ b}
    for name, (bs, _, _) in inputs.items():
        for v, mod in versions.items():
            fns[(name, v)] = lambda bs=bs, mod=mod: [mod.encode_references(model, t) for t in bs]
    clock = time.process_time
    times: dict = {key: [] for key in fns}
    for fn in fns.values():  # warm-up
        fn()
    for _ in range(args.repeats):
        for key, fn in fns.items():
            t0 = clock()
            fn()
            times[key].append(clock() - t0)
    med = {key: statistics.median(ts) for key, ts in times.items()}
    peak = 2 * 2048**3 / med[("matmul", None)]
    load = os.getloadavg()
    print(
        f"\n## encode_references vs a 2048³ float32 matmul, model `small`, {args.threads} thread(s), "
        f"process CPU clock, median of {args.repeats} interleaved runs\n"
    )
    print(
        f"Matmul: {peak / 1e9:,.1f} GFLOP/s. Load average at the end: {load[0]:.1f} / {load[1]:.1f} / "
        f"{load[2]:.1f} on {os.cpu_count()} cores.\n"
    )
    print("| input | version | refs/s | useful GFLOP/s | / matmul rate |\n|---|---|---|---|---|")
    for name, (bs, flops, n) in inputs.items():
        for v in versions:
            t = med[(name, v)]
            print(f"| {name} | {v} | {n / t:,.1f} | {flops / t / 1e9:,.1f} | **{flops / t / peak:.1%}** |")
    if args.before:
        old = versions[f"at {args.before}"]
        same = diff = 0
        for bs, _, _ in inputs.values():
            for t in bs:
                x, y = current.encode_references(model, t), old.encode_references(model, t)
                same += int((x.positions == y.positions).all(dim=(1, 2, 3)).sum())
                diff = max(diff, float((x.kv - y.kv).abs().max()))
        total = sum(n for _, _, n in inputs.values())
        print(
            f"\nSame kept tokens now and at {args.before}: {same:,} of {total:,} references; "
            f"largest difference in a kept key or value: {diff:.2e}."
        )


def job(cfg_over: list[str], template: Path, work: Path, name: str) -> dict:
    from jobs.config import load_config
    from jobs.stages.encode import run_encode

    bank = work / name
    shutil.rmtree(bank, ignore_errors=True)
    shutil.copytree(template, bank)
    cfg = load_config(None, [*cfg_over, f"bank.uri={bank}"])
    with CPUMeter() as cpu:
        t0 = time.perf_counter()
        summary = run_encode(cfg)
        wall = time.perf_counter() - t0
    assert summary.get("status") != "up_to_date", summary
    shutil.rmtree(bank, ignore_errors=True)
    return {"wall": wall, "cpu": cpu.seconds, "stage": summary["refs_per_s"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--bank", default="/tmp/fetch-bank", help="an ingested demo bank (ingested here if missing)")
    ap.add_argument("--codec", default="int8", choices=("raw-bf16", "raw-fp16", "raw-fp32", "int8", "vq"))
    ap.add_argument("--refs", type=int, default=1024, help="first N references of the bank (0 = all)")
    ap.add_argument("--tiny", type=int, default=64, help="references of the fixed-cost twin job")
    ap.add_argument("--refs-per-shard", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--cpus", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument(
        "--omp-wait-policy",
        choices=("ACTIVE", "PASSIVE"),
        default=None,
        help="OMP_WAIT_POLICY for this process and the Ray workers (default: unset)",
    )
    ap.add_argument(
        "--vs-matmul",
        action="store_true",
        help="only the model's encode_references against a same-process matmul (no Ray)",
    )
    ap.add_argument("--before", default=None, help="with --vs-matmul: also model/memory.py at this git revision")
    ap.add_argument("--threads", type=int, default=1, help="with --vs-matmul: torch threads")
    args = ap.parse_args()
    if args.omp_wait_policy:
        os.environ["OMP_WAIT_POLICY"] = args.omp_wait_policy  # read when libgomp loads: before torch
    os.environ.setdefault("M3_PROGRESS", "0")

    import lance

    from jobs.config import RayConfig, load_config
    from jobs.models import model_for_encoding
    from jobs.runtime import init_ray, quiet_ray_data
    from jobs.stages.encode import quantizer
    from model import load_model
    from model.codecs import make_codec
    from storage.bank import Bank

    src = Path(args.bank)
    ensure_bank(src)
    if args.vs_matmul:
        from model import ModelConfig

        tokens = (
            lance.dataset(str(src / "refs.lance"))
            .to_table(columns=["token_ids"], limit=args.refs or None)
            .column("token_ids")
            .to_pylist()
        )
        vs_matmul(args, tokens, ModelConfig.from_preset("small"))
        return
    work = Path(tempfile.mkdtemp(prefix="m3-bench-encode-"))
    template, tiny = work / "template", work / "tiny"
    n = subset_bank(src, template, args.refs)
    subset_bank(src, tiny, args.tiny)
    base = [
        f"encode.codec={args.codec}",
        f"encode.batch_size={args.batch_size}",
        "encode.checkpoint=null",
        "encode.seed=0",
        f"encode.refs_per_shard={args.refs_per_shard}",
        f"ray.num_cpus={args.cpus}",
        "model.preset=small",
    ]
    cfg = load_config(None, [*base, f"bank.uri={template}"])
    mdir = model_for_encoding(cfg, Bank(str(template)))  # the untrained demo start, saved once, copied with the bank
    shutil.copytree(mdir, tiny / "models" / mdir.name)
    codec_kw, vq_train = {}, None
    if args.codec == "vq":  # run_encode retrains it in every job; train here once for the baseline
        t0 = time.perf_counter()
        bank = Bank(str(template))
        codec_kw = quantizer(cfg, bank, mdir, bank.dataset("refs").uri, n)
        vq_train = time.perf_counter() - t0
    model, codec = load_model(mdir), make_codec(args.codec, **codec_kw)
    tokens = lance.dataset(str(template / "refs.lance")).to_table(columns=["token_ids"]).column("token_ids").to_pylist()
    shards = shard_order(tokens, args.refs_per_shard)
    n_tok = sum(len(t) for t in tokens)

    t0 = time.perf_counter()
    init_ray(RayConfig(num_cpus=args.cpus))
    quiet_ray_data()
    ray_start = time.perf_counter() - t0
    # The first job pays for Ray Data's first use and a cold file cache for the worker imports:
    # once per cluster, not per job, so it runs untimed (on the tiny bank, 2 actors).
    t0 = time.perf_counter()
    job([*base, "encode.actors=2", "encode.threads_per_actor=1"], tiny, work, "warmup")
    warmup = time.perf_counter() - t0
    time.sleep(3)  # let the warm-up's actors exit
    with CPUMeter() as idle:
        time.sleep(5)
    ray_idle = idle.seconds / 5

    res: dict = {lay: {"model": [], "job": [], "tiny": []} for lay in LAYOUTS}
    for r in range(args.repeats):
        for actors, threads in LAYOUTS:
            over = [*base, f"encode.actors={actors}", f"encode.threads_per_actor={threads}"]
            res[(actors, threads)]["model"].append(model_only(model, codec, shards, args.batch_size, threads))
            res[(actors, threads)]["job"].append(job(over, template, work, f"run-{r}-{actors}x{threads}"))
            res[(actors, threads)]["tiny"].append(job(over, tiny, work, f"tiny-{r}-{actors}x{threads}"))
            print(
                f"(repeat {r + 1}: {actors}x{threads} model {res[(actors, threads)]['model'][-1]['wall']:.1f} s, "
                f"job {res[(actors, threads)]['job'][-1]['wall']:.1f} s)",
                file=sys.stderr,
                flush=True,
            )

    med = lambda xs, key: statistics.median(x[key] for x in xs)  # noqa: E731
    load = os.getloadavg()
    policy = os.environ.get("OMP_WAIT_POLICY", "unset")
    print(
        f"\n## Encode job vs model-only, {n:,} references ({n_tok:,} tokens) of the demo bank, codec "
        f"{args.codec}, model small, batch {args.batch_size}, {args.refs_per_shard} refs per shard, "
        f"{args.cpus} CPUs, OMP_WAIT_POLICY={policy}\n"
    )
    print(
        f"Medians of {args.repeats} interleaved repeats. Load average at the end: "
        f"{load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} (1/5/15 min) on {os.cpu_count()} cores. "
        f"Fixed cost = the {args.tiny}-reference twin job; marginal = the other {n - args.tiny:,} "
        f"references over the time (or CPU) beyond it.\n"
    )
    print("Wall clock:\n")
    print(
        "| layout (actors × threads) | model-only refs/s | job refs/s | job / model-only | job fixed cost (s) "
        "| job marginal refs/s | marginal / model-only | full bank (11,419 refs) est. refs/s |"
    )
    print("|---|---|---|---|---|---|---|---|")
    summary, cpu_rows = {}, []
    for actors, threads in LAYOUTS:
        d = res[(actors, threads)]
        # the model-only process runs `threads` threads; `actors` of them would do actors x that
        ideal = n / med(d["model"], "wall") * actors
        j_wall, fixed = med(d["job"], "wall"), med(d["tiny"], "wall")
        marginal = (n - args.tiny) / max(j_wall - fixed, 1e-9)
        full = 11419 / (fixed + 11419 / marginal)
        summary[(actors, threads)] = n / j_wall
        print(
            f"| {actors} × {threads} | {ideal / actors:,.1f}{f' (×{actors} = {ideal:,.1f})' if actors > 1 else ''} "
            f"| {n / j_wall:,.1f} | **{n / j_wall / ideal:.0%}** | {fixed:.1f} | {marginal:,.1f} | "
            f"{marginal / ideal:.0%} | {full:,.1f} |"
        )
        m_cpu, j_cpu, f_cpu = n / med(d["model"], "cpu"), med(d["job"], "cpu"), med(d["tiny"], "cpu")
        m_marg = (n - args.tiny) / max(j_cpu - f_cpu, 1e-9)
        cpu_rows.append(
            f"| {actors} × {threads} | {m_cpu:,.1f} | {n / j_cpu:,.1f} | **{n / j_cpu / m_cpu:.0%}** | "
            f"{f_cpu:.1f} | {m_marg:,.1f} | {m_marg / m_cpu:.0%} |"
        )
    print("\nCPU time (job: the driver and every process it started; model-only: this process):\n")
    print(
        "| layout (actors × threads) | model-only refs per CPU-s | job refs per CPU-s | job / model-only "
        "| job fixed cost (CPU-s) | job marginal refs per CPU-s | marginal / model-only |"
    )
    print("|---|---|---|---|---|---|---|")
    print("\n".join(cpu_rows))
    best = max(summary, key=summary.get)
    other = min(summary, key=summary.get)
    print(
        f"\nBetter on this box: **{best[0]} actor(s) × {best[1]} thread(s)**, "
        f"{summary[best] / summary[other]:.2f}× the job rate of {other[0]} × {other[1]}."
    )
    print(
        f"Ray start-up (not timed): {ray_start:.1f} s; warm-up job ({args.tiny} refs, not timed): {warmup:.1f} s; "
        f"idle Ray cluster: {ray_idle:.2f} CPU-s per s (included in the job's CPU)."
    )
    if vq_train is not None:
        print(
            f"vq: quantizer training took {vq_train:.1f} s here; run_encode retrains it in every job "
            f"(included in the job's times above)."
        )
    print(
        "Model-only ×actors: the rate `actors` independent model processes would reach if each ran as fast "
        "as the one measured; on a loaded box they cannot, so the wall fraction of the 2-actor layout is "
        "pessimistic and the CPU fraction is the one to compare."
    )
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
