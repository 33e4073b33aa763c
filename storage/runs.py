"""The `runs` table: one row per scheduled rebuild attempt, in the bank beside what it built.

A row is added when the attempt starts (status "running") and updated when it ends, so a
scheduler killed mid-run leaves a visible "running" row rather than nothing. `m3 sql` sees it
like any table: `SELECT * FROM runs ORDER BY started_at`.
"""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone

import pyarrow as pa

from storage.bank import Bank

COMPACT_FRAGMENTS = 20

RUNS = pa.schema(
    [
        pa.field("run_id", pa.string(), nullable=False),
        pa.field("slot", pa.timestamp("us", tz="UTC"), nullable=False),  # the cron time it was scheduled for
        pa.field("attempt", pa.int32(), nullable=False),  # 0, then retries
        pa.field("mode", pa.string(), nullable=False),  # "process" or "ray-job"
        pa.field("job_id", pa.string()),  # the Ray submission id, if a job
        pa.field("started_at", pa.timestamp("us", tz="UTC"), nullable=False),
        pa.field("ended_at", pa.timestamp("us", tz="UTC")),
        pa.field(
            "status", pa.string(), nullable=False
        ),  # running | published | up_to_date | failed | skipped | interrupted
        pa.field("added", pa.int64()),
        pa.field("changed", pa.int64()),
        pa.field("removed", pa.int64()),
        pa.field("versions", pa.string()),  # JSON {table: version} of the live build after the run
        pa.field("tag", pa.string()),
        pa.field("error", pa.string()),
    ]
)


def now() -> datetime:
    return datetime.now(timezone.utc)


def _quote(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


class RunLog:
    def __init__(self, bank: Bank):
        self.bank = bank

    def _table(self):
        if not self.bank.has("runs"):
            return self.bank.db.create_table("runs", schema=RUNS, exist_ok=True)
        return self.bank.db.open_table("runs")

    def start(self, run_id: str, slot: datetime, attempt: int, mode: str, job_id: str | None = None) -> None:
        row = {f.name: None for f in RUNS}
        row.update(
            run_id=run_id,
            slot=slot.astimezone(timezone.utc),
            attempt=attempt,
            mode=mode,
            job_id=job_id,
            started_at=now(),
            status="running",
        )
        self._table().add(pa.Table.from_pylist([row], schema=RUNS))

    def finish(
        self, run_id: str, status: str, summary: dict | None = None, error: str | None = None, job_id: str | None = None
    ) -> None:
        s = summary or {}
        values = {"ended_at": now(), "status": status, "error": (error or "")[-2000:] or None}
        for k in ("added", "changed", "removed"):
            if s.get(k) is not None:
                values[k] = int(s[k])
        if s.get("versions") is not None:
            values["versions"] = json.dumps(s["versions"], sort_keys=True)
        if s.get("tag"):
            values["tag"] = s["tag"]
        if job_id:
            values["job_id"] = job_id
        table = self._table()
        table.update(where=f"run_id = {_quote(run_id)}", values=values)
        if len(self.bank.dataset("runs").get_fragments()) >= COMPACT_FRAGMENTS:
            # every run adds a fragment and two versions: merge them and drop versions older than
            # an hour (no reader of this small table holds one that long), so it stays small
            table.optimize(cleanup_older_than=timedelta(hours=1))

    def rows(self) -> list[dict]:
        if not self.bank.has("runs"):
            return []
        return sorted(self._table().to_arrow().to_pylist(), key=lambda r: r["started_at"])
