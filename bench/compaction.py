"""Ten scheduled 1 % rebuilds, with compaction after each, and a reader running all along:
how much of the bank is dead bytes, and does a reader ever fail?

    .venv/bin/python bench/compaction.py [--records 2000] [--rebuilds 10] [--changed 0.01]

The demo config on the first --records FOLDOC entries: one full `run_rebuild`, then --rebuilds
times: --changed of the entries edited (a different 1 % each time), `run_rebuild` with
`rebuild.compact_after: true` (what `m3 schedule` runs). A reader thread meanwhile opens the
live build over and over (Bank(live=True): SQL over memories and refs, and a MemoryStore fetch of
a few references) and counts its reads and failures. After each rebuild, `m3 bank stats`'s live
and dead bytes. The baseline, in the same process: the bank's size had nothing been deleted
(what is on disk plus every byte retention and compaction removed), against its size now.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.rebuild import ROOT, records, write  # noqa: E402


def reader(uri: str, stop: threading.Event, counts: dict) -> None:
    from storage.bank import Bank
    from storage.memory_store import MemoryStore
    from storage.sql import query

    while not stop.is_set():
        try:
            bank = Bank(uri, live=True)
            _, rows = query(bank, "SELECT count(*) FROM memories")
            ids = bank.dataset("memories").to_table(columns=["ref_id"], limit=4).column("ref_id").to_pylist()
            store = MemoryStore(bank, bank.metadata("memories")["model_hash"], write_back=False)
            store.fetch(ids)
            counts["reads"] += 1
        except Exception:  # noqa: BLE001 - what the bench counts
            counts["failures"] += 1
            counts["last"] = traceback.format_exc(limit=3)
        time.sleep(0.2)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--records", type=int, default=2000)
    ap.add_argument("--rebuilds", type=int, default=10)
    ap.add_argument("--changed", type=float, default=0.01)
    ap.add_argument("--dir", default=None)
    a = ap.parse_args()

    from jobs.config import load_config
    from jobs.ops.bank_stats import bank_stats
    from jobs.ops.rebuild import run_rebuild
    from jobs.runtime import init_ray
    from storage.bank import Bank

    work = Path(a.dir or tempfile.mkdtemp(prefix="m3-bench-compaction-"))
    corpus, bank_dir = work / "corpus.jsonl.gz", work / "bank"
    recs = records(a.records)
    write(corpus, recs)
    overrides = [f"corpus.paths=[{corpus}]", f"bank.uri={bank_dir}", "rebuild.compact_after=true"]
    cfg = load_config(ROOT / "configs" / "demo.yaml", overrides)
    init_ray(cfg.ray)
    run_rebuild(cfg)
    counts = {"reads": 0, "failures": 0}
    stop = threading.Event()
    thread = threading.Thread(target=reader, args=(str(bank_dir), stop, counts), daemon=True)
    thread.start()
    every = max(1, round(1 / a.changed))
    removed = 0
    print(
        f"\n## {a.rebuilds} scheduled rebuilds of {a.changed:.0%} each ({len(recs):,} FOLDOC entries, demo config, "
        f"keep_builds {cfg.rebuild.keep_builds}, compact_after), a reader running throughout\n"
    )
    print("| rebuild | seconds | live MB | dead MB | dead / bank | reads so far | reader failures |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for n in range(1, a.rebuilds + 1):
        edited = [
            dict(r, text=r["text"] + f" Revised in scheduled rebuild {n}.") if (i + n) % every == 0 else r
            for i, r in enumerate(recs)
        ]
        write(corpus, edited)
        recs = edited
        t = time.perf_counter()
        out = run_rebuild(load_config(ROOT / "configs" / "demo.yaml", overrides))
        for part in (out.get("retention") or {}, (out.get("compaction") or {}).get("retention") or {}):
            removed += sum(r["bytes_removed"] for r in part.values())
        s = bank_stats(Bank(str(bank_dir)), cfg.rebuild.keep_builds)
        live, dead = s["live_bytes"], s["dead_bytes"]
        print(
            f"| {n} | {time.perf_counter() - t:.1f} | {live / 2**20:.1f} | {dead / 2**20:.2f} | "
            f"{dead / max(live + dead, 1):.1%} | {counts['reads']} | {counts['failures']} |",
            flush=True,
        )
    stop.set()
    thread.join(timeout=30)
    kept = live + dead
    print(
        f"\nbank {kept / 2**20:.1f} MB on disk against {(kept + removed) / 2**20:.1f} MB had nothing been deleted: "
        f"ratio {kept / max(kept + removed, 1):.2f}"
    )
    print(f"reader: {counts['reads']} reads, {counts['failures']} failures")
    if counts["failures"]:
        print(counts["last"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
