"""`m3 bank compact`: merge small fragments and delete versions nothing holds, under the bank's write lock.

The work is storage/retention.compact_bank (the same retention code path `m3 rebuild` uses);
this adds the lock. Compaction publishes a build and deletes versions, so it must not run beside
a rebuild or any other writer (which would publish over it, or lose versions it is writing): it
takes the bank's write lock (jobs/ops/lock.py) and, if another command holds it, refuses at once
naming the holder. `m3 rebuild` with `rebuild.compact_after: true` calls `compact_locked` while
it holds the lock.
"""

from __future__ import annotations

from jobs.config import Config
from jobs.ops.lock import LockError, write_lock
from storage.bank import Bank
from storage.retention import compact_bank


def compact_locked(cfg: Config, bank: Bank) -> dict:
    """Compact; the caller holds the bank's write lock."""
    return compact_bank(bank, cfg.rebuild.keep_builds)


def run_compact(cfg: Config) -> dict:
    try:
        with write_lock(cfg, "compaction"):
            return compact_locked(cfg, Bank.of(cfg))
    except LockError as e:
        raise LockError(f"cannot compact while another command writes the bank: {e}") from None


def render(summary: dict) -> str:
    lines = [f"compact: live build {summary['build']}"]
    for table, c in summary["compacted"].items():
        lines.append(f"  {table}: fragments merged, v{c['from']} -> v{c['to']} (published as build {summary['build']})")
    if not summary["compacted"]:
        lines.append("  no table had fragments to merge")
    for table in summary["skipped_newer_write"]:
        lines.append(f"  {table}: not compacted (a newer unpublished version exists)")
    freed = 0
    for table, r in summary["retention"].items():
        freed += r["bytes_removed"]
        lines.append(f"  {table}: {r['versions_removed']} version(s) removed, {r['bytes_removed']:,} B freed")
    lines.append(f"  total freed: {freed:,} B")
    return "\n".join(lines)
