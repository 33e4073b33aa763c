"""A whole bank build in this process, with the peak resident set of every process of it, per stage.

    python -m tests.storage.build_peaks WORK_DIR {wide,narrow} N_DOCS

Builds a bank from the first N_DOCS long FOLDOC entries (tests/conftest.py write_foldoc_corpus)
on an embedded Ray started here (so Ray's raylet, GCS and workers are descendants of this
process): ingest, embed, encode, `m3 rebuild` (publishes that build), then every EDIT_EVERY-th
document edited and `m3 rebuild` again (the incremental path: unchanged memories copied from
the old table, checked against its slab). The model is the tiny preset made wide where memories
are concerned (WIDE: 2 memory layers x 4 KV heads x 64 dims, raw fp32); `wide` keeps every
token of a reference (mem_top_k=128: 512 KiB per memory), `narrow` one (4 KiB per memory), with
the same corpus, model shape and stages, so the two builds differ only in the width of the
memories table.

Peaks: before each stage every process's high-water mark is reset to its current RSS (writing
5 to /proc/PID/clear_refs, Linux's documented reset of VmHWM), and a thread reads VmHWM of this
process and every descendant every PERIOD s until the stage ends; a process's peak in a stage
is the largest value read. (A process that ends within PERIOD of its peak can be missed; the
shard actors live until their stage ends.) Prints one JSON line: per stage, the peak of the
driver (this process; and its RSS when the stage began), of the largest Ray worker and of each
other Ray process by its program ("ray:raylet", "ray:gcs_server", "ray:dashboard.py", ...);
the memories table's rows, payload bytes and bytes on disk (its newest version's data files).
"""

from __future__ import annotations

import gzip
import json
import os
import re
import sys
import threading
import time
from pathlib import Path

os.environ.setdefault("M3_PROGRESS", "0")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import psutil  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

PERIOD = 0.05
EDIT_EVERY = 50
EDIT = " This entry was revised for the bounded memory test."
WIDE = [
    "model.preset=tiny",
    "model.vocab_size=600",
    "model.n_layers=2",
    "model.n_mem_layers=2",
    "model.n_heads=4",
    "model.n_kv_heads=4",
    "model.head_dim=64",
    "model.d_model=256",
    "model.mlp_hidden=256",
    "model.ref_max_tokens=128",
    "model.max_seq_len=512",
    "encode.codec=raw-fp32",
]
TOP_K = {"wide": 128, "narrow": 1}


def _hwm(pid: int) -> int:
    """VmHWM of pid in bytes (0 if it is gone)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            m = re.search(r"^VmHWM:\s+(\d+) kB", f.read(), re.M)
        return int(m.group(1)) << 10 if m else 0
    except OSError:
        return 0


def _reset(pid: int) -> None:
    try:
        with open(f"/proc/{pid}/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


class Peaks(threading.Thread):
    """VmHWM of this process and its descendants, sampled every PERIOD s, per stage."""

    def __init__(self):
        super().__init__(daemon=True)
        self.me, self.stage, self.peaks, self.begun = psutil.Process(), None, {}, {}
        self.lock, self.done = threading.Lock(), threading.Event()

    def kind(self, p: psutil.Process) -> str:
        """Read at every sample, not once: a worker is forked by the raylet and named by the raylet's
        command line until it execs."""
        if p.pid == self.me.pid:
            return "driver"
        try:
            name, argv = p.name(), p.cmdline()
        except psutil.Error:
            return "gone"
        if name.startswith("ray::") or "default_worker" in " ".join(argv[:3]):
            return "worker"
        # raylet, gcs_server, or a Python script of Ray's (dashboard.py, log_monitor.py, ...)
        prog = next((a for a in argv[:3] if a.endswith(".py")), argv[0] if argv else name)
        return "ray:" + os.path.basename(prog)

    def procs(self) -> list[psutil.Process]:
        try:
            return [self.me, *self.me.children(recursive=True)]
        except psutil.Error:
            return [self.me]

    def sample(self) -> None:
        with self.lock:
            if self.stage is None:
                return
            peaks = self.peaks.setdefault(self.stage, {})
            for p in self.procs():
                k, v = self.kind(p), _hwm(p.pid)
                if k != "gone" and v:  # a process's last kind (its exec'd program) and its largest VmHWM
                    peaks[p.pid] = (k, max(v, peaks.get(p.pid, ("", 0))[1]))

    def begin(self, stage: str) -> None:
        with self.lock:
            for p in self.procs():
                _reset(p.pid)
            self.stage, self.begun[stage] = stage, _hwm(self.me.pid)

    def end(self) -> None:
        self.sample()
        with self.lock:
            self.stage = None

    def run(self) -> None:
        while not self.done.wait(PERIOD):
            self.sample()

    def summary(self) -> dict:
        out = {}
        for stage, peaks in self.peaks.items():
            by = {"driver": 0, "worker": 0}
            for kind, v in peaks.values():
                by[kind] = max(by.get(kind, 0), v)
            out[stage] = {**by, "driver_start": self.begun[stage]}
        return out


def corpus(path: Path, n_docs: int, edit: bool) -> Path:
    from tests.conftest import foldoc_records

    with gzip.open(path, "wt", encoding="utf-8") as f:
        for i, rec in enumerate(foldoc_records(n_docs, min_words=60)):
            if edit and i % EDIT_EVERY == 0:
                rec = {**rec, "text": rec["text"] + EDIT}
            f.write(json.dumps(rec) + "\n")
    return path


def main(work: Path, width: str, n_docs: int) -> dict:
    from jobs.config import load_config
    from jobs.ops.rebuild import run_rebuild
    from jobs.runtime import init_ray, quiet_ray_data
    from jobs.stages.embed import run_embed
    from jobs.stages.encode import run_encode
    from jobs.stages.ingest import run_ingest
    from storage.bank import Bank
    from tests.conftest import tiny_settings

    work.mkdir(parents=True, exist_ok=True)
    path = corpus(work / "corpus.jsonl.gz", n_docs, edit=False)
    overrides = [
        *tiny_settings(path, work / "bank"),
        *WIDE,
        f"model.mem_top_k={TOP_K[width]}",
        # a shard's memories (16 x 512 KiB) and the encoder's buffers for it are the worker's own
        # cost: kept small beside the table, whose whole is what the bound is about
        "encode.refs_per_shard=16",
    ]
    cfg = load_config(ROOT / "configs" / "demo.yaml", overrides)
    init_ray(cfg.ray)
    quiet_ray_data()
    peaks = Peaks()
    peaks.start()
    seconds = {}

    def stage(name, fn, *a):
        t = time.perf_counter()
        peaks.begin(name)
        try:
            return fn(*a)
        finally:
            peaks.end()
            seconds[name] = round(time.perf_counter() - t, 1)

    stage("ingest", run_ingest, cfg)
    stage("embed", run_embed, cfg)
    stage("encode", run_encode, cfg)
    stage("rebuild", run_rebuild, cfg)
    corpus(path, n_docs, edit=True)
    inc = stage("rebuild_edited", run_rebuild, cfg)
    peaks.done.set()

    bank = Bank(str(work / "bank"))
    ds = bank.dataset("memories")
    payload = len(ds.take([0], columns=["payload"]).column("payload")[0].as_py())
    rows = ds.count_rows()
    on_disk = sum(
        os.path.getsize(os.path.join(ds.uri, "data", f.path)) for fr in ds.get_fragments() for f in fr.data_files()
    )
    return {
        "width": width,
        "rows": rows,
        "payload_bytes": payload,
        "table_bytes": rows * payload,
        "table_disk_bytes": on_disk,
        "reencoded": inc["memories"]["added"] + inc["memories"]["changed"],
        "peaks": peaks.summary(),
        "seconds": seconds,
    }


if __name__ == "__main__":
    out = main(Path(sys.argv[1]), sys.argv[2], int(sys.argv[3]))
    print(json.dumps(out))
