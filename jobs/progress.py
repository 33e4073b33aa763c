"""A progress line for long stages: done of total, rate, time left, at most every few seconds.

    progress = Progress("encode", total=12, rows=12_000)
    progress.step(rows=1000)   # after each shard
    # encode: 3 of 12 shard(s), 3,000 rows, 41.2 rows/s, ~218 s left

Plain lines (not a redrawn bar), so they read the same in a terminal, a log file and a Ray
job's logs; the first and the last step always print.
"""

from __future__ import annotations

import time
from typing import Callable


class Progress:
    def __init__(
        self,
        label: str,
        total: int,
        rows: int | None = None,
        unit: str = "shard(s)",
        every_s: float = 5.0,
        out: Callable[[str], None] | None = None,
    ):
        self.label, self.total, self.rows_total, self.unit = label, total, rows, unit
        self.every_s, self.out = every_s, out or (lambda line: print(line, flush=True))
        self.done = self.rows = 0
        self.t0 = self.last = time.monotonic()

    def step(self, n: int = 1, rows: int = 0) -> None:
        self.done += n
        self.rows += rows
        now = time.monotonic()
        if now - self.last < self.every_s and self.done not in (1, self.total):
            return
        self.last = now
        self.out(self.line(now - self.t0))

    def line(self, elapsed: float) -> str:
        parts = [f"{self.label}: {self.done} of {self.total} {self.unit}"]
        if self.rows:
            parts.append(f"{self.rows:,} rows, {self.rows / max(elapsed, 1e-9):,.1f} rows/s")
        if 0 < self.done < self.total:
            parts.append(f"~{elapsed / self.done * (self.total - self.done):,.0f} s left")
        elif self.done >= self.total:
            parts.append(f"{elapsed:,.1f} s")
        return ", ".join(parts)
