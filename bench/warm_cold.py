"""`m3 bank stats`' warm/cold count against the code of another commit, on the same bank.

    .venv/bin/python bench/warm_cold.py --bank BANK --before 9be5d40 [--repeats 5]

The count joins every reference's key with the memories' (and the written-back rows'): it is the
part of `m3 bank stats` that grows with the bank. Prints both results (they must be equal), the
best of `repeats` for each, and the ratio.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # before bench/ (its model.py is no package)

from jobs.ops import bank_stats  # noqa: E402
from storage.bank import Bank  # noqa: E402


def best(fn, repeats: int) -> tuple[dict, float]:
    times, out = [], None
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return out, min(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bank", required=True)
    ap.add_argument("--before", required=True, help="the commit whose jobs/ops/bank_stats.py is the baseline")
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    bank = Bank(args.bank)
    meta = bank.metadata("memories")
    src = subprocess.run(
        ["git", "show", f"{args.before}:jobs/ops/bank_stats.py"], capture_output=True, text=True, check=True
    ).stdout
    old: dict = {}
    exec(compile(src, f"bank_stats@{args.before}", "exec"), old)
    got, t_new = best(lambda: bank_stats.warm_cold(bank, meta), args.repeats)
    want, t_old = best(lambda: old["warm_cold"](bank, meta), args.repeats)
    print(f"references {got['refs']:,}; same counts: {got == want}")
    print(f"{args.before}: {t_old * 1e3:.1f} ms   now: {t_new * 1e3:.1f} ms   ratio {t_old / t_new:.2f}x")


if __name__ == "__main__":
    main()
