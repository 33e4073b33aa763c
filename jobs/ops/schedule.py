"""`m3 schedule`: rebuild the bank on the config's cron expression until SIGTERM.

    m3 schedule -c configs/demo.yaml                       # each run: a child process here
    m3 schedule -c configs/demo.yaml --address http://head:8265   # each run: a Ray job

Where a run executes:
- with an address (`--address` or schedule.address), each run is `m3 submit rebuild`: a Ray job
  on the cluster, followed to its end;
- without one, each run is a child process on this machine (`python -m jobs rebuild`),
  which starts its own embedded Ray. Not the scheduler's own process: a run that crashes,
  leaks memory or is killed takes only itself down, and the scheduler records it and retries.

Runs never overlap: the next slot is computed when a run has ended (slots missed meanwhile are
skipped, and said so), and the bank's rebuild lock keeps a manual `m3 rebuild` or a second
scheduler from running beside it (such a run is recorded as "skipped"). A failed run is retried
`schedule.max_retries` times after backoff_s, 2*backoff_s, ... (capped at backoff_max_s). Every
attempt is a row of the `runs` table (storage/runs.py). SIGTERM or SIGINT: no new run starts; a
run in progress is stopped (the rebuild is crash-safe: the live build is untouched, and the next
run resumes its work) and recorded as "interrupted"; then the scheduler exits 0.

A run leaves its summary (counts, versions) in <bank>/_runs/<run id>.json, on the bank's storage
(a shared mount, or the bucket of an s3:// bank) so that a Ray job on another node can hand it
back. On an s3:// bank the lock that keeps runs apart is a conditional PUT (jobs/ops/lock.py).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
from datetime import datetime
from pathlib import Path

from jobs.config import Config
from jobs.config.cron import Cron
from jobs.project import ROOT
from storage.bank import Bank
from storage.layout import is_uri
from storage.runs import RunLog

SUMMARY_ENV = "M3_RUN_SUMMARY"


def _runs_dir(bank: Bank):
    """Where runs leave their summaries: beside the bank, `<bank>/_runs/`, on the bank's own
    storage (a shared mount, or the bucket of an s3:// bank), so that a Ray job on another node
    can hand its counts back (`m3 rebuild` writes it through storage/staging.py)."""
    runs = bank.layout.runs()
    return runs if is_uri(bank.uri) else runs.resolve()


def _config_dir(bank: Bank, runs_dir) -> Path:
    """Where the resolved config for child rebuilds goes: a local file they can read (beside
    the runs of a local bank, as before; a temporary directory for a bank at a URI)."""
    return runs_dir if not is_uri(bank.uri) else Path(tempfile.gettempdir()) / "m3-schedule"


class Scheduler:
    def __init__(self, cfg: Config, address: str | None = None):
        self.cfg, self.address = cfg, address or cfg.schedule.address
        self.cron = Cron.parse(cfg.schedule.cron)
        self.bank = Bank.of(cfg)
        self.log = RunLog(self.bank)
        self.stopping = threading.Event()
        self.child: subprocess.Popen | None = None
        self.runs_dir = _runs_dir(self.bank)
        self.runs_dir.mkdir(parents=True, exist_ok=True)
        # a child rebuild reads the config resolved here (--set overrides included)
        import yaml

        from jobs.ops.submit import portable_config

        config_dir = _config_dir(self.bank, self.runs_dir)
        config_dir.mkdir(parents=True, exist_ok=True)
        self.config_file = config_dir / f"schedule-config-{os.getpid()}.yaml"
        self.config_file.write_text(yaml.safe_dump(portable_config(cfg), sort_keys=False), encoding="utf-8")

    def on_signal(self, signum, frame) -> None:
        print(f"schedule: {signal.Signals(signum).name}: stopping", flush=True)
        self.stopping.set()
        child = self.child
        if child is not None and child.poll() is None:
            child.terminate()

    def attempt(self, run_id: str) -> tuple[str, dict, str | None, str | None]:
        """One rebuild: (status, summary, error, job id)."""
        summary_path = self.runs_dir / f"{run_id}.json"  # a Path, or a UPath on the bucket
        if self.address:
            return self._as_ray_job(run_id, summary_path)
        env = {**os.environ, SUMMARY_ENV: str(summary_path), "M3_PROGRESS": "0"}
        self.child = subprocess.Popen(
            [sys.executable, "-m", "jobs", "rebuild", "-c", str(self.config_file)],
            cwd=ROOT,
            env=env,
            stderr=subprocess.PIPE,
            text=True,
        )
        _, err = self.child.communicate()
        code, self.child = self.child.returncode, None
        return self._outcome(code == 0, summary_path, err, None)

    def _as_ray_job(self, run_id: str, summary_path):
        from jobs.ops.submit import submit, wait

        sid, what = submit(self.cfg, "rebuild", [], self.address, env={SUMMARY_ENV: str(summary_path)})
        if what == "succeeded":  # same config and corpus as a job that succeeded: nothing new to build
            return "up_to_date", {}, None, sid
        status = wait(self.address, sid, follow=False)
        return self._outcome(status == "SUCCEEDED", summary_path, f"Ray job {sid} {status}", sid)

    def _outcome(self, ok: bool, summary_path, err: str | None, job_id: str | None):
        summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}
        if ok:
            return summary.get("status", "published"), summary, None, job_id
        if self.stopping.is_set():
            return "interrupted", summary, "stopped by SIGTERM", job_id
        if err and "another rebuild of this bank is running" in err:
            return "skipped", summary, err.strip().splitlines()[-1], job_id
        return "failed", summary, (err or "").strip(), job_id

    def run_slot(self, slot: datetime) -> str:
        """A scheduled run with its retries; returns the last attempt's status."""
        s = self.cfg.schedule
        for attempt in range(s.max_retries + 1):
            run_id = f"{slot:%Y%m%dT%H%M%S}-{attempt}"
            self.log.start(run_id, slot, attempt, "ray-job" if self.address else "process")
            try:
                status, summary, error, job_id = self.attempt(run_id)
            except Exception as e:  # noqa: BLE001 - a run's failure must not end the schedule
                status, summary, error, job_id = "failed", {}, f"{type(e).__name__}: {e}", None
            self.log.finish(run_id, status, summary, error, job_id)
            print(
                f"schedule: run {run_id}: {status}" + (f" ({error.splitlines()[-1][:200]})" if error else ""),
                flush=True,
            )
            if status != "failed" or attempt == s.max_retries or self.stopping.is_set():
                return status
            delay = min(s.backoff_s * 2**attempt, s.backoff_max_s)
            print(f"schedule: retrying in {delay:.0f} s", flush=True)
            if self.stopping.wait(delay):
                return status
        return status

    def run(self, max_runs: int | None = None) -> int:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self.on_signal)
        where = f"as Ray jobs at {self.address}" if self.address else "as child processes on this machine"
        print(f"schedule: rebuilding {self.bank.uri} on '{self.cron.text}', {where}", flush=True)
        runs = 0
        while not self.stopping.is_set() and (max_runs is None or runs < max_runs):
            slot = self.cron.next_after(datetime.now())
            print(f"schedule: next run at {slot:%Y-%m-%d %H:%M:%S}", flush=True)
            if self.stopping.wait(max(0.0, (slot - datetime.now()).total_seconds())):
                break
            self.run_slot(slot)
            runs += 1
            missed = self.cron.next_after(slot)
            if missed < datetime.now():
                print(
                    f"schedule: the run outlasted its interval; slots from {missed:%H:%M:%S} were skipped", flush=True
                )
        self.config_file.unlink(missing_ok=True)
        print(f"schedule: stopped after {runs} run(s)", flush=True)
        return 0


def run_schedule(cfg: Config, max_runs: int | None = None, address: str | None = None) -> int:
    return Scheduler(cfg, address).run(max_runs)
