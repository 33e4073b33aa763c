"""What the slab's per-row crc32 check costs a fetch: the same store path with the check on and
off, in one process, passes interleaved (storage/slab.py "Integrity on read").

    .venv/bin/python bench/fetch.py --codecs raw-bf16 int8    # once: encodes the banks it reads
    .venv/bin/python bench/slab_check.py [--work /tmp/m3-bench-fetch] [--refs 3072] [--repeats 7]

For each codec and batch size (5 and 160), whole passes over every memory of the bank in random
batches of distinct ids (each answer dropped, as bench/fetch.py does), on a MemoryStore reading
the slab (slab="require"): `check on` is the store as it ships, `check off` the same store with
its reader's crc32s removed (SlabReader.crcs = None: no check). Two modes, as in bench/fetch.py:
a new store per pass (store miss, new store) and the store that made the warming pass (store
miss, store in use). Medians of --repeats passes, on and off alternating, in ms per batch; and
the check alone (row_crcs of one batch already in RAM), median of 201 calls.
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work", default="/tmp/m3-bench-fetch")
    ap.add_argument("--refs", type=int, default=3072)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--codecs", nargs="*", default=["raw-bf16", "int8"])
    args = ap.parse_args()
    os.environ.setdefault("M3_PROGRESS", "0")

    import numpy as np
    import torch

    torch.set_num_threads(1)
    from storage.bank import Bank
    from storage.memory_store import MemoryStore
    from storage.slab import ensure_slab, row_crcs

    rng = np.random.default_rng(0)
    print(
        "| codec | batch | payload B | mode | check off ms/batch | check on ms/batch | cost ms/batch | cost % |"
        " check alone ms |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for codec in args.codecs:
        bank = Bank(str(Path(args.work) / f"bank-{codec}-{args.refs}"))
        mh = bank.metadata("memories")["model_hash"]
        ensure_slab(bank, bank.dataset("memories").version)  # a format-1 slab is written again
        probe = MemoryStore(bank, mh, cache_size=1, slab="require")
        ids, per = list(probe.row_of), probe.slab.payload_bytes
        n = len(ids)
        for b in (5, 160):
            order = [ids[i] for i in rng.permutation(n)]
            batches = [order[i : i + b] for i in range(0, n - n % b, b)]
            buf = probe.slab.read(rng.permutation(n)[:b])
            alone = statistics.median(_t(lambda: row_crcs(buf)) for _ in range(201))
            for mode in ("new store", "store in use"):
                times = {True: [], False: []}
                for _ in range(args.repeats):
                    for check in (True, False):
                        s = MemoryStore(bank, mh, cache_size=b, slab="require")
                        for x in batches:  # pages into the page cache (and this store's map)
                            s.fetch(x)
                        if mode == "new store":
                            s = MemoryStore(bank, mh, cache_size=b, slab="require")
                        if not check:
                            s.slab.crcs = None
                        gc.collect()
                        t = _t(lambda: [s.fetch(x) and None for x in batches])  # noqa: F821 - bound; deleted after
                        times[check].append(t / len(batches) * 1e3)
                        del s
                on, off = statistics.median(times[True]), statistics.median(times[False])
                print(
                    f"| {codec} | {b} | {per:,} | {mode} | {off:.3f} | {on:.3f} | {on - off:+.3f} | "
                    f"{(on - off) / off * 100:+.0f} % | {alone * 1e3:.3f} |",
                    flush=True,
                )
        probe.slab.close()
    load = os.getloadavg()
    print(f"\nLoad average at the end {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} on {os.cpu_count()} cores.")


def _t(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


if __name__ == "__main__":
    main()
