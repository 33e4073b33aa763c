"""Memories fetched and decoded per second through MemoryStore.fetch, per codec, from the
version's payload slab and through Lance's take, against a sequential read of the same payload
bytes from disk, all measured in the same run.

    .venv/bin/m3 ingest -c configs/demo.yaml --set bank.uri=/tmp/fetch-bank   # once, ~30 s
    .venv/bin/python bench/fetch.py [--bank /tmp/fetch-bank] [--refs 3072] [--repeats 3]

Banks: the first --refs references of the ingested bank, encoded once per codec (raw-bf16,
int8, vq) by the encode job (2 actors × 1 thread, demo model `small`) into separate copies
under --work, which writes each version's payload slab (storage/slab.py); a later run reuses
them (--reencode to rebuild). Every encode key is set here (load_config(None, overrides)), not
read from configs/demo.yaml.

For each codec and batch size (5, and 160 = 32 chunks × 5 memories, the paper's per-retrieval
load), in batches of distinct random ref_ids, two stores: `slab` (MemoryStore, slab="require")
and `lance` (slab="off": the take() path, what a bank without a slab gets):
- cold: one store (opened untimed), the OS page cache dropped before every batch, untimed
  (`sync; echo 3 > /proc/sys/vm/drop_caches`, root only; without root there are no cold rows);
  the median over --cold-batches batches;
- store miss, warm file cache: a new store, the files already in the page cache; whole
  passes over every memory, each answer dropped before the next fetch (as a serving loop
  does: answers kept alive make every fetch write fresh, faulting pages), the median of
  --repeats; "store in use": the same pass again on
  the store that made the warming pass (a cache of one batch walked in the same order misses
  every batch), so its memory map already holds the pages: a serving store's steady state,
  where a new store's first touch of each page costs a minor fault (fault-around: ~17 per
  160 raw-bf16 rows, ~0.1 ms);
- store hit: a store holding every memory already (its cache as large as the bank).
The baseline: the slab's payload file (exactly the payload bytes of every memory, nothing
else) read sequentially with open().read() in 8 MiB reads, cold (after a drop) and warm, the
median of --repeats, in memories/s at the codec's payload bytes per memory. Warm passes are
also compared with the same read into one reused buffer (`readinto`: no fresh 8 MiB allocation
per call, whose page faults come and go with the allocator's state), in wall clock and in CPU
seconds of this process. fetch returns
decoded tensors (raw-bf16 as bfloat16, int8 and vq as float32); the read returns bytes.

Also measured: the decode kernel alone (160 payloads already in RAM) against memcpy of the same
bytes, and the payload read alone (no decode, no cache) from the slab (memory map, and
os.preadv per run of adjacent rows), through Lance take(), and through Lance's blob API
(`read_blobs` of a copy of the payloads in a blob-encoded column). Times are wall clock (other
jobs share the 2 cores).
"""

from __future__ import annotations

import argparse
import gc
import math
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.append(str(Path(__file__).resolve().parent))  # for bench/encode.py; after the root (bench/model.py)

ROOT = Path(__file__).resolve().parents[1]
CODECS = ("raw-bf16", "int8", "vq")
BATCHES = (5, 160)


def drop_caches() -> bool:
    gc.collect()  # closes the maps of stores gone: the kernel keeps mapped pages through a drop
    try:
        os.sync()
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True
    except OSError:
        return False


def encoded_bank(src: Path, work: Path, codec: str, n: int, reencode: bool) -> tuple[Path, float | None]:
    """A copy of the bank's first n references, encoded with `codec`; (path, encode seconds or None if reused)."""
    from encode import subset_bank  # bench/encode.py

    from jobs.config import load_config
    from jobs.stages.encode import run_encode
    from storage.bank import Bank

    bank = work / f"bank-{codec}-{n}"
    if (
        not reencode
        and (bank / "memories.lance").exists()
        and Bank(str(bank)).metadata("memories").get("codec") == codec
    ):
        return bank, None
    shutil.rmtree(bank, ignore_errors=True)
    subset_bank(src, bank, n)
    cfg = load_config(
        None,
        [
            f"bank.uri={bank}",
            f"encode.codec={codec}",
            "encode.batch_size=32",
            "encode.checkpoint=null",
            "encode.seed=0",
            "encode.actors=2",
            "encode.threads_per_actor=1",
            "encode.refs_per_shard=1024",
            "ray.num_cpus=2",
            "model.preset=small",
        ],
    )
    t0 = time.perf_counter()
    run_encode(cfg)
    return bank, time.perf_counter() - t0


def seq_read(files: list[Path]) -> int:
    n = 0
    for p in files:
        with open(p, "rb", buffering=0) as f:
            while chunk := f.read(8 << 20):
                n += len(chunk)
    return n


_INTO = bytearray(8 << 20)


def seq_readinto(files: list[Path]) -> int:
    """seq_read into one reused buffer: the page cache's copy alone. read() allocates 8 MiB per
    call, and whether glibc hands back reused heap or a fresh mmap (2,048 page faults) depends
    on what the process freed before: the same read measured 2.5 or 7 ms CPU per 10 MB."""
    n, view = 0, memoryview(_INTO)
    for p in files:
        with open(p, "rb", buffering=0) as f:
            while k := f.readinto(view):
                n += k
    return n


def timed(fn) -> tuple[float, float]:
    gc.collect()
    w, c = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - w, time.process_time() - c


def blob_copy(path: Path, ds) -> "object":
    """The payloads in a Lance blob-encoded column (a copy beside the bank), for read_blobs."""
    import lance
    import pyarrow as pa

    where = path / "payload-blob.lance"
    if not where.exists():
        col = ds.to_table(columns=["payload"]).column("payload").cast(pa.large_binary())
        field = pa.field("payload", pa.large_binary(), metadata={"lance-encoding:blob": "true"})
        lance.write_dataset(pa.table({"payload": col}, schema=pa.schema([field])), str(where))
    return lance.dataset(str(where))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--bank", default="/tmp/fetch-bank", help="an ingested demo bank (ingested here if missing)")
    ap.add_argument("--work", default="/tmp/m3-bench-fetch", help="where the encoded bank copies are kept")
    ap.add_argument("--refs", type=int, default=3072, help="first N references of the bank (0 = all)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cold-batches", type=int, default=20, help="batches timed cold, each after a page-cache drop")
    ap.add_argument("--reencode", action="store_true")
    ap.add_argument("--threads", type=int, default=1, help="torch threads of this process (decode)")
    ap.add_argument("--codecs", nargs="*", default=list(CODECS), choices=CODECS)
    args = ap.parse_args()
    os.environ.setdefault("M3_PROGRESS", "0")

    import numpy as np
    import torch

    torch.set_num_threads(args.threads)

    from encode import ensure_bank  # bench/encode.py

    from jobs.config import RayConfig
    from jobs.ops.bank_stats import dense_bytes
    from jobs.runtime import init_ray, quiet_ray_data
    from storage.bank import Bank
    from storage.memory_store import MemoryStore
    from storage.slab import SlabReader, ensure_slab, paths

    src, work = Path(args.bank), Path(args.work)
    ensure_bank(src)
    work.mkdir(parents=True, exist_ok=True)
    banks = {}
    for codec in args.codecs:
        if (work / f"bank-{codec}-{args.refs}" / "memories.lance").exists() and not args.reencode:
            banks[codec] = encoded_bank(src, work, codec, args.refs, False)
            continue
        init_ray(RayConfig(num_cpus=2))
        quiet_ray_data()
        banks[codec] = encoded_bank(src, work, codec, args.refs, True)
    if any(sec is not None for _, sec in banks.values()):
        import ray

        ray.shutdown()  # no idle cluster beside the measurements

    can_drop = drop_caches()
    rng = np.random.default_rng(args.seed)
    rows, read_rows, extra, notes, kernel_rows = [], [], [], [], []
    for codec, (path, enc_s) in banks.items():
        bank = Bank(str(path))
        meta = bank.metadata("memories")
        mh = meta["model_hash"]
        ensure_slab(
            bank, bank.dataset("memories").version
        )  # written by the encode job; a bank of an older run gets one
        t0 = time.perf_counter()
        store = MemoryStore(bank, mh, cache_size=1, slab="require")
        open_slab = time.perf_counter() - t0
        t0 = time.perf_counter()
        MemoryStore(bank, mh, cache_size=1, slab="off")
        open_lance = time.perf_counter() - t0
        ids = list(store.row_of)
        n = len(ids)
        per = store.codec.nbytes(store.shape)
        slab_file = paths(bank, store.ds.version)[0]
        store.slab.close()  # no map may outlive its measurement: it would keep pages through a drop
        assert slab_file.stat().st_size == n * per
        dense = dense_bytes(meta["config"]["model"])
        extra.append(
            f"| {codec} | {tuple(store.shape)} | {per:,} | {dense / per:,.0f}× | {store.dtype} | "
            f"{store.entry_bytes():,} | {open_slab * 1e3:.0f} / {open_lance * 1e3:.0f} | "
            f"{'reused' if enc_s is None else f'{enc_s:.1f} s'} |"
        )

        # the baseline: the same payload bytes read sequentially, cold and warm, in memories/s; the
        # warm read is also repeated beside every timed pass (`seq_warm`), and ratios are per pass
        def seq_warm(into: bool = False):
            """memories/s of a warm sequential read; with into, also (wall, CPU s of this process)
            of the same read into one reused buffer (seq_readinto)."""
            seq_read([slab_file])
            w = n / timed(lambda: seq_read([slab_file]))[0]
            if not into:
                return w
            return w, tuple(n / x for x in timed(lambda: seq_readinto([slab_file])))

        base = {"cold": [], "warm": []}
        for _ in range(args.repeats):
            if can_drop:
                drop_caches()
                base["cold"].append(n / timed(lambda: seq_read([slab_file]))[0])
            base["warm"].append(seq_warm())
        read_rate = {k: statistics.median(v) for k, v in base.items() if v}
        read_mib = {k: v * per / 2**20 for k, v in read_rate.items()}

        # both paths answer the same (mixed hits, misses, repeats)
        a = MemoryStore(bank, mh, cache_size=300, slab="require")
        b_ = MemoryStore(bank, mh, cache_size=300, slab="off")
        for _ in range(20):
            q = [ids[i] for i in rng.integers(0, min(n, 800), 160)]
            (ma, ka), (mb, kb) = a.fetch(q), b_.fetch(q)
            assert torch.equal(ma, mb) and torch.equal(ka, kb) and (a.hits, a.misses) == (b_.hits, b_.misses)
        notes.append(
            f"{codec}: a cache of 300 entries after 20 requests of 160 (from 800 refs) holds "
            f"{a.cache_nbytes():,} B = 300 × {a.entry_bytes():,} B ({len(a.cache)} entries)"
        )
        del a, b_

        ds = bank.dataset("memories")
        blobs = blob_copy(path, ds)
        for b in BATCHES:
            order = [ids[i] for i in rng.permutation(n)]
            batches = [order[i : i + b] for i in range(0, n - n % b, b)]
            m = len(batches) * b

            def cold(fetch) -> float:
                """memories/s of one batch read right after the page cache is dropped (median)."""
                ts = []
                for ids_ in batches[: args.cold_batches]:
                    drop_caches()
                    ts.append(timed(lambda: fetch(ids_))[0])
                return b / statistics.median(ts)

            def passes(make, warm_cache: bool, in_use: bool = False) -> tuple[float, float]:
                """(memories/s, its ratio to the sequential read timed just before) of whole passes
                over every batch: the medians over --repeats. The same ratio in CPU seconds of this
                process (fetch and read are single-threaded: less disturbed by other jobs than
                wall clock) and in wall clock, both against seq_readinto, are appended to into_ratio."""
                out, ratio, iratio, cratio = [], [], [], []
                for _ in range(args.repeats):
                    s = make()
                    for ids_ in batches:  # pages into the page cache; with warm_cache, the store's too
                        s.fetch(ids_)
                    if not warm_cache and not in_use:
                        s = make()
                    hits0, misses0 = s.hits, s.misses
                    ref, (iref, cref) = seq_warm(into=True)
                    w, c = timed(
                        lambda: [s.fetch(x) and None for x in batches]  # noqa: F821 - bound; deleted after
                    )  # each answer dropped, as a serving loop does
                    out.append(m / w)
                    ratio.append(out[-1] / ref)
                    iratio.append(out[-1] / iref)
                    cratio.append(m / c / cref)
                    assert (s.hits - hits0, s.misses - misses0) == ((m, 0) if warm_cache else (0, m)), (
                        s.hits,
                        s.misses,
                    )
                    del s
                into_ratio.append((statistics.median(iratio), statistics.median(cratio)))
                return statistics.median(out), statistics.median(ratio)

            res = {}
            for impl, mode in (("slab", "require"), ("lance", "off")):
                r, into_ratio = {}, []
                if can_drop:
                    st = MemoryStore(bank, mh, cache_size=b, slab=mode)
                    r["cold"] = (cold(st.fetch), None)
                    del st
                r["miss"] = passes(lambda: MemoryStore(bank, mh, cache_size=b, slab=mode), False)
                # the same store again: a cache of one batch, walked in the same order, misses
                # every batch of the pass; its memory map already holds the pages (no faults)
                r["miss_in_use"] = passes(lambda: MemoryStore(bank, mh, cache_size=b, slab=mode), False, True)
                r["hit"] = passes(lambda: MemoryStore(bank, mh, cache_size=n, slab=mode), True)
                r["into"] = dict(zip(("miss", "miss_in_use", "hit"), into_ratio))
                res[impl] = r
            for mode, label, ref in (
                ("cold", "cold (page cache dropped before each batch)", "cold"),
                ("miss", "store miss, warm files", "warm"),
                ("miss_in_use", "store miss, warm files, store in use", "warm"),
                ("hit", "store hit (all in RAM)", "warm"),
            ):
                if mode not in res["slab"]:
                    continue
                (s_, sr), (l_, lr) = res["slab"][mode], res["lance"][mode]
                sr, lr = sr or s_ / read_rate[ref], lr or l_ / read_rate[ref]
                si = res["slab"]["into"].get(mode)
                rows.append(
                    f"| {codec} | {b} | {label} | {s_:,.0f} | {b / s_ * 1e3:.2f} | {l_:,.0f} | "
                    f"{b / l_ * 1e3:.2f} | {s_ / l_:.1f}× | {read_mib[ref]:,.0f} ({ref}) | "
                    f"{read_rate[ref]:,.0f} | **{sr:.2f}** | {'n/a | n/a' if si is None else f'{si[0]:.2f} | {si[1]:.2f}'} | {lr:.3f} |"
                )

            # where a miss goes: the payload read alone (no decode, no cache)
            row_of = store.row_of
            reader = {}  # a new reader per measurement (cold or warm): see store.slab.close() above

            def slab_read(mapped):
                def make():
                    reader[mapped] = SlabReader(slab_file, n, per, mapped=mapped)

                return make, lambda x: reader[mapped].read(np.array([row_of[r] for r in x]))

            mm_make, mm_read = slab_read(True)
            pr_make, pr_read = slab_read(False)
            reads = (
                ("slab, memory map", mm_make, mm_read),
                ("slab, os.preadv per run", pr_make, pr_read),
                ("Lance take(payload)", None, lambda x: ds.take(np.sort([row_of[r] for r in x]), columns=["payload"])),
                (
                    "Lance read_blobs (blob column)",
                    None,
                    lambda x: blobs.read_blobs("payload", indices=np.sort([row_of[r] for r in x]).tolist()),
                ),
            )
            for name, make, fn in reads:
                if make:
                    make()
                cold_rate = cold(fn) if can_drop else None
                warm, ratio = [], []
                for _ in range(args.repeats):
                    if make:
                        make()
                    for x in batches:
                        fn(x)
                    ref = seq_warm()
                    warm.append(m / timed(lambda: [fn(x) for x in batches])[0])
                    ratio.append(warm[-1] / ref)
                reader.clear()
                w = statistics.median(warm)
                read_rows.append(
                    f"| {codec} | {b} | {name} | {f'{cold_rate:,.0f}' if cold_rate else 'n/a'} | "
                    f"{f'{b / cold_rate * 1e3:.2f}' if cold_rate else 'n/a'} | {w:,.0f} | "
                    f"{statistics.median(ratio):.2f} |"
                )
        # the decode kernel alone, on 160 payloads already in RAM, against memcpy of the same bytes
        rd = SlabReader(slab_file, n, per)
        buf = rd.read(rng.permutation(n)[:160])
        rd.close()
        out_b = 160 * math.prod(store.shape) * store.dtype.itemsize

        def med(fn, reps=51):
            return statistics.median(timed(fn)[0] for _ in range(reps))

        dst, big, big2 = np.empty_like(buf), np.ones(out_b, np.uint8), np.ones(out_b, np.uint8)
        t_dec = med(lambda: store._decode(buf, []))
        t_cp, t_cp_out = med(lambda: np.copyto(dst, buf)), med(lambda: np.copyto(big2, big))
        mib = lambda nb, t: nb / t / 2**20  # noqa: E731
        kernel_rows.append(
            f"| {codec} | {buf.nbytes:,} | {out_b:,} ({store.dtype}) | {t_dec * 1e3:.3f} | "
            f"{mib(buf.nbytes, t_dec):,.0f} | {mib(out_b, t_dec):,.0f} | {mib(buf.nbytes, t_cp):,.0f} | "
            f"{mib(out_b, t_cp_out):,.0f} | **{t_cp / t_dec:.2f}** | {read_mib['warm']:,.0f} |"
        )
        print(f"({codec} done)", file=sys.stderr, flush=True)

    load = os.getloadavg()
    print(
        f"\n## MemoryStore.fetch from the payload slab and through Lance, {args.refs:,} memories per codec, "
        f"model small, torch threads {args.threads}\n"
    )
    print(
        f"Wall clock. Warm rows: median of {args.repeats} passes, each fetching every memory once in random "
        f"batches of distinct ids, each pass on a new store. Cold rows: median over {args.cold_batches} batches, "
        f"the OS page cache {'dropped before each (untimed)' if can_drop else 'could NOT be dropped (not root): no cold rows'}; "
        f"the store (ref_id index, open files) stays. Baseline: the slab's payload file read sequentially with "
        f"open().read(), cold = after a drop; warm ratios are per pass, against a read timed just before it "
        f"(the MiB/s column is the median of {args.repeats} reads at the start); readinto: the same read into one "
        f"reused buffer, per pass too, wall clock and CPU seconds of this process. Load average at the end {load[0]:.1f} / {load[1]:.1f} / "
        f"{load[2]:.1f} on {os.cpu_count()} cores.\n"
    )
    print(
        "| codec | batch | mode | slab memories/s | slab ms/batch | Lance memories/s | Lance ms/batch | slab / Lance "
        "| sequential read MiB/s | read memories/s | **slab / read** | slab / readinto | slab / readinto, CPU s "
        "| Lance / read |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    print("\n".join(rows))
    print("\n### The payload read alone (no decode, no cache), memories/s\n")
    print("| codec | batch | read | cold memories/s | cold ms/batch | warm memories/s | warm / sequential read |")
    print("|---|---|---|---|---|---|---|")
    print("\n".join(read_rows))
    print("\n### The decode kernel alone: 160 payloads in RAM -> memories (median of 51 calls), against memcpy\n")
    print(
        "| codec | payload B | output B | decode ms | decode: payload MiB/s | decode: output MiB/s "
        "| memcpy of the payload MiB/s | memcpy of the output MiB/s | **decode / memcpy (payload bytes)** "
        "| sequential read MiB/s (warm) |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    print("\n".join(kernel_rows))
    print("\nThe cache's bound in bytes:\n")
    print("\n".join(f"- {p}" for p in notes))
    print(
        "\n| codec | memory shape | payload B/memory | vs dense bf16 KV | fetch dtype | cache B/entry "
        "| store open ms (slab / Lance) | encode job |"
    )
    print("|---|---|---|---|---|---|---|---|")
    print("\n".join(extra))


if __name__ == "__main__":
    main()
