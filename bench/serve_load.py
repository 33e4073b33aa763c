"""`m3 serve` under load (issue 29): start-up, one client against `m3 generate`'s engine, 8
clients (batching), and a publish in the middle of the 8-client run.

    .venv/bin/python bench/serve_load.py -c configs/demo.yaml [--set bank.uri=...] [--seconds 60]

1. start: `python -m jobs serve` as a subprocess on a free loopback port; seconds until its first
   completion is answered (the machine warm: a second start, after one that loaded the same files);
2. engine: `Inference.generate` (what `m3 generate` runs) for one prompt in this process, the
   server idle: the median of --repeats;
3. one client: requests back to back for --single-seconds: median latency and new tokens/s;
4. 8 clients for --seconds, and halfway the bank publishes a new live build (a new version of the
   `rejects` table, which serving does not read, with every other table as live: the replicas
   load and switch to it as to any build): failed requests, the builds answers name (each names
   exactly one), latency and tokens/s.
Prompts: --clients prompts cut to the same token length (the engine decodes rows of one context
length together: the model takes no padding mask), greedy, --max-tokens new tokens each.
Then the same with prompts of different lengths (--mixed-seconds), which decode one length after
another. Wall clock on whatever else shares the cores; the load average is printed.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from jobs.config import load_config  # noqa: E402
from jobs.runtime import free_port  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TEXTS = [
    "A compiler is a program that translates source code",
    "An operating system is the software that manages the hardware",
    "A database is an organised collection of data stored",
    "The kernel of an operating system is the part that",
    "A network protocol is a set of rules that govern",
    "An interpreter is a program which executes other programs",
    "A file system is the way an operating system organises",
    "A programming language is a notation for writing programs",
]


def post(url: str, body: dict, timeout: float = 300) -> dict:
    req = urllib.request.Request(url, json.dumps(body).encode(), {"content-type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read())


def equal_length_prompts(tokenizer, n: int) -> list[str]:
    """n prompts of one token length: each text cut to the shortest one's tokens."""
    ids = [tokenizer.encode(t).ids for t in TEXTS[:n]]
    width = min(len(i) for i in ids)
    out = [tokenizer.decode(i[:width]) for i in ids]
    assert len({len(tokenizer.encode(t).ids) for t in out}) == 1, "cut prompts re-encode to other lengths"
    return out


def start_server(args, port: int) -> tuple[subprocess.Popen, float]:
    cmd = [sys.executable, "-m", "jobs", "serve", "-c", args.config, *sum((["--set", s] for s in args.set), [])]
    cmd += ["--set", f"serve.port={port}"]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    url = f"http://127.0.0.1:{port}/v1/completions"
    while True:
        if proc.poll() is not None:
            raise SystemExit(f"m3 serve exited with {proc.returncode}: {' '.join(cmd)}")
        try:
            post(url, {"model": args.model, "prompt": "A", "max_tokens": 1}, timeout=10)
            return proc, time.perf_counter() - t0
        except (urllib.error.URLError, OSError):
            time.sleep(0.2)


def stop_server(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)


def load(url, model, prompts, clients, seconds, max_tokens, during=None):
    """`clients` threads sending back to back for `seconds`; `during` runs halfway."""
    records, errors, stop = [], [], threading.Event()

    def client(k):
        i = k
        while not stop.is_set():
            t0 = time.perf_counter()
            try:
                r = post(url, {"model": model, "prompt": prompts[i % len(prompts)], "max_tokens": max_tokens})
                records.append((time.perf_counter() - t0, r["usage"]["completion_tokens"], r["build"], time.time()))
            except Exception as e:  # noqa: BLE001 - counted as a failed request
                errors.append(repr(e))
            i += 1

    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    published = None
    if during is not None:
        time.sleep(seconds / 2)
        published = during()
        time.sleep(max(0.0, seconds - (time.perf_counter() - t0)))
    else:
        time.sleep(seconds)
    stop.set()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    lat = sorted(r[0] for r in records)
    return {
        "clients": clients,
        "requests": len(records),
        "failed": len(errors),
        "errors": errors[:3],
        "latency_median_s": statistics.median(lat) if lat else None,
        "latency_p95_s": lat[int(0.95 * (len(lat) - 1))] if lat else None,
        "tokens_per_s": sum(r[1] for r in records) / wall,
        "builds": {str(b): sum(1 for r in records if r[2] == b) for b in sorted({r[2] for r in records}, key=str)},
        "published": published,
    }


def publish_touched(cfg) -> dict:
    """A new live build: a new version of `rejects` (same rows), every other table as live."""
    from storage.bank import Bank
    from storage.live import publish, read_manifest

    bank = Bank.of(cfg)
    versions = dict(read_manifest(bank)["versions"])
    t = bank.dataset("rejects", versions["rejects"]).to_table()
    meta = bank.metadata("rejects")
    meta.pop("schema_version", None), meta.pop("table", None), meta.pop("written_at", None)
    versions["rejects"] = bank.write("rejects", t.schema.remove_metadata(), t.to_batches(), meta)
    return {"build": publish(bank, versions, {"by": "bench/serve_load.py"})["build"], "at": time.time()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-c", "--config", default="configs/demo.yaml")
    ap.add_argument("--set", action="append", default=[])
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--seconds", type=float, default=60)
    ap.add_argument("--single-seconds", type=float, default=20)
    ap.add_argument("--mixed-seconds", type=float, default=20)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--no-publish", action="store_true")
    ap.add_argument("--out", help="write the figures as JSON here")
    args = ap.parse_args()
    cfg = load_config(args.config, args.set)
    args.model = cfg.serve.model_name or cfg.name
    from jobs.inference.engine import Inference

    inf = Inference(cfg)
    prompts = equal_length_prompts(inf.tokenizer, args.clients)
    out = {"load_avg_start": os.getloadavg(), "prompt_tokens": len(inf.encode(prompts[0]))}

    port = free_port()
    proc, _ = start_server(args, port)  # the first start warms the page cache
    stop_server(proc)
    proc, out["start_to_first_answer_s"] = start_server(args, port)
    url = f"http://127.0.0.1:{port}/v1/completions"
    try:
        body = {"model": args.model, "prompt": prompts[0], "max_tokens": args.max_tokens}
        with urllib.request.urlopen(url.replace("/v1/completions", "/health"), timeout=30) as r:
            torch.set_num_threads(json.loads(r.read())["threads"])  # the engine as the replica runs it
        o = inf.generate([prompts[0]], max_new_tokens=args.max_tokens)[0]  # warm, both
        post(url, body)
        engine, server = [], []
        for _ in range(args.repeats):  # interleaved: both see the same load from elsewhere
            t0 = time.perf_counter()
            o = inf.generate([prompts[0]], max_new_tokens=args.max_tokens)[0]
            engine.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            got = post(url, body)
            server.append(time.perf_counter() - t0)
            assert got["choices"][0]["token_ids"] == o.tokens, "the server's tokens are not the engine's"
        out["engine_s"], out["server_same_prompt_s"] = statistics.median(engine), statistics.median(server)
        out["engine_tokens"], out["engine_threads"] = len(o.tokens), torch.get_num_threads()
        out["ratio_server_to_engine"] = out["server_same_prompt_s"] / out["engine_s"]
        del inf  # its threads and memory are not the server's
        out["one_client"] = load(url, args.model, prompts, 1, args.single_seconds, args.max_tokens)
        during = None if args.no_publish else (lambda: publish_touched(cfg))
        out["n_clients"] = load(url, args.model, prompts, args.clients, args.seconds, args.max_tokens, during)
        with urllib.request.urlopen(url.replace("/v1/completions", "/health"), timeout=30) as r:
            out["health_after"] = json.loads(r.read())
        out["throughput_ratio"] = out["n_clients"]["tokens_per_s"] / out["one_client"]["tokens_per_s"]
        mixed = TEXTS[: args.clients]
        out["n_clients_mixed_lengths"] = load(url, args.model, mixed, args.clients, args.mixed_seconds, args.max_tokens)
    finally:
        stop_server(proc)
    out["load_avg_end"] = os.getloadavg()
    print(json.dumps(out, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
