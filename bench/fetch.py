"""Memories fetched and decoded per second through MemoryStore.fetch, per codec, against a plain
sequential read of the same table's bytes from disk, measured in the same run.

    .venv/bin/m3 ingest -c configs/demo.yaml --set bank.uri=/tmp/fetch-bank   # once, ~30 s
    .venv/bin/python bench/fetch.py [--bank /tmp/fetch-bank] [--refs 3072] [--repeats 3]

Banks: the first --refs references of the ingested bank, encoded once per codec (raw-bf16,
int8, vq) by the encode job (2 actors × 1 thread, demo model `small`) into separate copies
under --work; a later run reuses them (--reencode to rebuild). Every encode key is set here
(load_config(None, overrides)), not read from configs/demo.yaml.

For each codec and batch size (5, and 160 = 32 chunks × 5 memories, the paper's per-retrieval
load), in batches of distinct random ref_ids:
- cold: one store (ref_id index and dataset open; opening is timed apart), the OS page cache
  dropped before every batch, untimed (`sync; echo 3 > /proc/sys/vm/drop_caches`, root only;
  without root there are no cold rows); the median over --cold-batches batches;
- store miss, warm file cache: a new store, the table's pages already in the page cache; whole
  passes over every memory, the median of --repeats;
- store hit: a store holding every memory already (cache_size >= the bank): the LRU lookup and
  the stacking of the decoded tensors.
The baseline: the memories table's data files read sequentially with open().read() (8 MiB
reads), cold (after a drop) and warm, the median of --repeats; MiB/s turned into memories/s at
the codec's payload bytes per memory. fetch returns float32 tensors; the read returns bytes.

Also measured: a prototype of a faster MemoryStore (prototype_store_class: same answers,
checked), the payload read alone through Lance take() against np.memmap of a flat file of the
same fixed-size payloads (where a miss's time goes), and how much memory the current cache
really holds. Times are wall clock (other jobs share the 2 cores).
"""

from __future__ import annotations

import argparse
import gc
import math
import mmap
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
    if not reencode and (bank / "memories.lance").exists() and Bank(str(bank)).metadata("memories").get("codec") == codec:
        return bank, None
    shutil.rmtree(bank, ignore_errors=True)
    subset_bank(src, bank, n)
    cfg = load_config(None, [
        f"bank.uri={bank}", f"encode.codec={codec}", "encode.batch_size=32", "encode.checkpoint=null",
        "encode.seed=0", "encode.actors=2", "encode.threads_per_actor=1", "encode.refs_per_shard=1024",
        "ray.num_cpus=2", "model.preset=small"])
    t0 = time.perf_counter()
    run_encode(cfg)
    return bank, time.perf_counter() - t0


def prototype_store_class():
    """The fix proposed for storage/memory_store.py, prototyped here (same answers, checked below).

    - the LRU cache is a preallocated slab (cache_size, *shape) float32 plus ref_id -> slot: a
      hit costs one index_select for the whole request instead of a Python stack of per-memory
      views, and the cache holds exactly cache_size memories (today each cached memory is a view
      that keeps its whole decoded batch alive, see `pinned_bytes`);
    - n_tokens of every row is read once at open (beside ref_id), so the masks come from RAM and
      take() reads the payload column only (not ref_id and n_tokens: the rows asked are known);
    - payloads are decoded from the Arrow buffer of the take, with no per-row bytes objects.
    """
    import numpy as np
    import torch

    from storage.bank import BankError
    from storage.memory_store import MemoryStore

    class SlabStore(MemoryStore):
        def __init__(self, bank, model_hash, cache_size=4096, version=None):
            super().__init__(bank, model_hash, cache_size, version)
            self.kept = torch.as_tensor(self.ds.to_table(columns=["n_tokens"]).column("n_tokens")
                                        .to_numpy().astype(np.int64))
            self.nbytes = self.codec.nbytes(self.shape)
            self.slab = torch.empty((cache_size, *self.shape))
            self.slot: dict[str, int] = {}  # insertion order = LRU order (oldest first)
            self.free = list(range(cache_size - 1, -1, -1))
            self._k = torch.arange(self.shape[3])

        def fetch(self, ref_ids):
            idx = lambda xs: torch.tensor(xs, dtype=torch.long)  # noqa: E731  (lists index slowly)
            try:
                rows = idx([self.row_of[r] for r in ref_ids])
            except KeyError as e:
                raise BankError(f"no memory for reference {e.args[0]!r} in this bank") from None
            masks = self._k[None, :] < self.kept.index_select(0, rows)[:, None]
            uniq = list(dict.fromkeys(ref_ids))
            missing = [r for r in uniq if r not in self.slot]
            self.hits += len(ref_ids) - len(missing)
            self.misses += len(missing)
            for r in uniq:  # refresh the hits' LRU position
                if r in self.slot:
                    self.slot[r] = self.slot.pop(r)
            if not missing:
                return self.slab.index_select(0, idx([self.slot[r] for r in ref_ids])), masks
            mrows = np.array([self.row_of[r] for r in missing], dtype=np.int64)
            order = np.argsort(mrows)
            arr = self.ds.take(mrows[order], columns=["payload"]).column("payload").combine_chunks()
            off = np.frombuffer(arr.buffers()[1], np.int32, count=len(arr) + 1, offset=4 * arr.offset)
            if (np.diff(off) != self.nbytes).any():
                return super().fetch(ref_ids)  # the old path names the corrupt row
            buf = np.frombuffer(arr.buffers()[2], np.uint8)[off[0]:off[-1]].reshape(len(arr), self.nbytes).copy()
            mems = self.codec._decode(buf, self.shape).reshape(len(arr), *self.shape).to(torch.float32)
            at = {missing[j]: i for i, j in enumerate(order)}  # ref -> row of mems
            if len(missing) == len(ref_ids):  # all misses, no repeats: one gather
                out = mems.index_select(0, idx([at[r] for r in ref_ids]))
            else:
                out = torch.empty((len(ref_ids), *self.shape))
                hit = [(i, self.slot[r]) for i, r in enumerate(ref_ids) if r in self.slot]
                new = [(i, at[r]) for i, r in enumerate(ref_ids) if r in at]
                if hit:
                    out.index_copy_(0, idx([i for i, _ in hit]), self.slab.index_select(0, idx([s for _, s in hit])))
                out.index_copy_(0, idx([i for i, _ in new]), mems.index_select(0, idx([j for _, j in new])))
            # insert after answering (a request larger than the cache is still answered whole), in
            # row order as MemoryStore does, so both caches hold the same entries
            keep = [missing[j] for j in order][-self.cache_size:]
            while len(self.free) < len(keep):
                self.free.append(self.slot.pop(next(iter(self.slot))))
            slots = [self.free.pop() for _ in keep]
            for r, s in zip(keep, slots):
                self.slot[r] = s
            self.slab.index_copy_(0, idx(slots), mems.index_select(0, idx([at[r] for r in keep])))
            return out, masks

    return SlabStore


def pinned_bytes(store) -> tuple[int, int]:
    """(bytes the cached memories are, bytes of the tensors their views keep alive)."""
    own = sum(m.numel() * m.element_size() for m, _ in store.cache.values())
    seen = {}
    for m, k in store.cache.values():
        for t in (m, k):
            st = t.untyped_storage()
            seen[st.data_ptr()] = st.nbytes()
    return own, sum(seen.values())


def seq_read(files: list[Path]) -> int:
    n = 0
    for p in files:
        with open(p, "rb", buffering=0) as f:
            while chunk := f.read(8 << 20):
                n += len(chunk)
    return n


def timed(fn) -> tuple[float, float]:
    gc.collect()
    w, c = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - w, time.process_time() - c


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
    from jobs.ops.bank_stats import dense_bytes
    from jobs.config import RayConfig
    from jobs.runtime import init_ray, quiet_ray_data
    from storage.bank import Bank
    from storage.memory_store import MemoryStore

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
    rows, proto_rows, read_rows, extra, pins = [], [], [], [], []
    for codec, (path, enc_s) in banks.items():
        bank = Bank(str(path))
        meta = bank.metadata("memories")
        t0 = time.perf_counter()
        store = MemoryStore(bank, meta["model_hash"], cache_size=1)
        open_s = time.perf_counter() - t0
        ids = list(store.row_of)
        n = len(ids)
        per = store.codec.nbytes(store.shape)
        dense = dense_bytes(meta["config"]["model"])
        files = sorted((path / "memories.lance" / "data").glob("*.lance"))
        file_bytes = sum(p.stat().st_size for p in files)
        sparse_bf16 = math.prod(store.shape) * 2
        extra.append(f"| {codec} | {tuple(store.shape)} | {per:,} | {dense:,} | {dense / per:,.0f}× | "
                     f"{sparse_bf16 / per:.1f}× | {file_bytes / n:,.0f} | {open_s * 1e3:.0f} | "
                     f"{'reused' if enc_s is None else f'{enc_s:.1f} s'} |")

        # the baseline: the table's data files read sequentially, cold and warm, in memories/s
        base = {"cold": [], "warm": []}
        for _ in range(args.repeats):
            if can_drop:
                drop_caches()
                base["cold"].append(file_bytes / timed(lambda: seq_read(files))[0])
            base["warm"].append(file_bytes / timed(lambda: seq_read(files))[0])
        read_rate = {k: statistics.median(v) / per for k, v in base.items() if v}
        read_mib = {k: statistics.median(v) / 2**20 for k, v in base.items() if v}

        SlabStore = prototype_store_class()
        # the prototype answers exactly what MemoryStore answers (mixed hits, misses, repeats)
        a, p = MemoryStore(bank, meta["model_hash"], cache_size=300), SlabStore(bank, meta["model_hash"], cache_size=300)
        for _ in range(40):
            q = [ids[i] for i in rng.integers(0, min(n, 800), 160)]
            (ma, ka), (mp, kp) = a.fetch(q), p.fetch(q)
            assert torch.equal(ma, mp) and torch.equal(ka, kp) and (a.hits, a.misses) == (p.hits, p.misses)
        own, held = pinned_bytes(a)
        pins.append(f"{codec}: cache of 300 entries after 40 random requests of 160 (from 800 refs): the cached "
                    f"memories are {own / 2**20:.1f} MiB, the tensors they keep alive {held / 2**20:.1f} MiB "
                    f"({held / own:.1f}×)")
        del a, p

        # a flat file of the fixed-size payloads: what a sidecar written by the encode job would be
        flat = path / "payload-flat.npy"
        if not flat.exists():
            col = bank.dataset("memories").to_table(columns=["payload"]).column("payload").combine_chunks()
            off = np.frombuffer(col.buffers()[1], np.int32, count=len(col) + 1, offset=4 * col.offset)
            np.save(flat, np.frombuffer(col.buffers()[2], np.uint8)[off[0]:off[-1]].reshape(len(col), per))

        for b in BATCHES:
            order = [ids[i] for i in rng.permutation(n)]
            batches = [order[i:i + b] for i in range(0, n - n % b, b)]
            m = len(batches) * b

            def cold(fetch) -> float:
                """memories/s of one batch read right after the page cache is dropped (median)."""
                ts = []
                for ids_ in batches[: args.cold_batches]:
                    drop_caches()
                    ts.append(timed(lambda: fetch(ids_))[0])
                return b / statistics.median(ts)

            def passes(make, warm_cache: bool) -> float:
                """memories/s of whole passes over every batch (median of --repeats)."""
                out = []
                for _ in range(args.repeats):
                    s = make()
                    for ids_ in batches:  # pages into the page cache; with warm_cache, the store's too
                        s.fetch(ids_)
                    if not warm_cache:
                        s = make()
                    out.append(m / timed(lambda: [s.fetch(x) for x in batches])[0])
                    assert s.misses == m and s.hits == (m if warm_cache else 0), (s.hits, s.misses)
                return statistics.median(out)

            res = {}
            for impl, cls in (("current", MemoryStore), ("proposed", SlabStore)):
                r = {}
                if can_drop and impl == "current":
                    st = cls(bank, meta["model_hash"], cache_size=b)
                    r["cold"] = cold(st.fetch)
                r["miss"] = passes(lambda: cls(bank, meta["model_hash"], cache_size=b), False)
                r["hit"] = passes(lambda: cls(bank, meta["model_hash"], cache_size=n), True)
                res[impl] = r
            for mode, label, ref in (("cold", "cold (page cache dropped before each batch)", "cold"),
                                     ("miss", "store miss, warm file cache", "warm"),
                                     ("hit", "store hit (all in RAM)", "warm")):
                for impl, table in (("current", rows), ("proposed", proto_rows)):
                    if mode not in res[impl]:
                        continue
                    rate = res[impl][mode]
                    line = (f"| {codec} | {b} | {label} | {rate:,.0f} | {b / rate * 1e3:.2f} | "
                            f"{read_mib[ref]:,.0f} ({ref}) | {read_rate[ref]:,.0f} | **{rate / read_rate[ref]:.3f}** |")
                    if impl == "proposed":
                        line += f" {rate / res['current'][mode]:.2f}× |"
                    table.append(line)

            # where a miss goes: the payload read alone (no decode, no cache)
            ds = bank.dataset("memories")
            mm = np.load(flat, mmap_mode="r")
            mm._mmap.madvise(mmap.MADV_RANDOM)  # no readahead: a batch reads its rows' pages only
            row_of = store.row_of
            for name, fn in (("Lance take(payload)", lambda x: ds.take(np.sort([row_of[r] for r in x]), columns=["payload"])),
                             ("np.memmap of a flat payload file", lambda x: np.ascontiguousarray(mm[np.sort([row_of[r] for r in x])]))):
                cold_rate = cold(fn) if can_drop else None
                warm = []
                for _ in range(args.repeats):
                    for x in batches:
                        fn(x)
                    warm.append(m / timed(lambda: [fn(x) for x in batches])[0])
                read_rows.append(f"| {codec} | {b} | {name} | {f'{cold_rate:,.0f}' if cold_rate else 'n/a'} | "
                                 f"{statistics.median(warm):,.0f} |")
        print(f"({codec} done)", file=sys.stderr, flush=True)

    load = os.getloadavg()
    print(f"\n## Fetch + decode through MemoryStore.fetch, {args.refs:,} memories per codec, model small, "
          f"torch threads {args.threads}\n")
    print(f"Wall clock. Warm rows: median of {args.repeats} passes, each fetching every memory once in random "
          f"batches of distinct ids. Cold rows: median over {args.cold_batches} batches, the OS page cache "
          f"{'dropped before each (untimed)' if can_drop else 'could NOT be dropped (not root): no cold rows'}; "
          f"the store (ref_id index, open dataset) stays. Sequential read: the table's data files with "
          f"open().read(), cold = after a drop. Load average at the end {load[0]:.1f} / {load[1]:.1f} / "
          f"{load[2]:.1f} on {os.cpu_count()} cores.\n")
    head = ("| codec | batch | mode | memories/s | ms per batch | sequential read MiB/s "
            "| sequential read memories/s (at payload B/memory) | fetch / read |")
    print(head)
    print("|---|---|---|---|---|---|---|---|")
    print("\n".join(rows))
    print("\n### Proposed MemoryStore (prototype in this script: slab LRU cache, payload-only take, "
          "masks from RAM), same passes\n")
    print(head + " vs current |")
    print("|---|---|---|---|---|---|---|---|---|")
    print("\n".join(proto_rows))
    print("\n### Where a miss goes: reading the payloads of a batch alone (no decode), memories/s\n")
    print("| codec | batch | read | cold | warm |")
    print("|---|---|---|---|---|")
    print("\n".join(read_rows))
    print("\nMemory held by the current cache (each entry is a view of its whole decoded batch):\n")
    print("\n".join(f"- {p}" for p in pins))
    print("\n| codec | memory shape | payload B/memory | dense bf16 KV B/ref | vs dense | vs sparse bf16 "
          "| table file B/row | store open (ms) | encode job |")
    print("|---|---|---|---|---|---|---|---|---|")
    print("\n".join(extra))


if __name__ == "__main__":
    main()
