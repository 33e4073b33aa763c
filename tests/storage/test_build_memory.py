"""A whole build holds a few batches of the memories table in any one process, never the table (issue 26).

Every stage streams: ingest, embed, encode, `m3 rebuild` publishing that build, and the
incremental `m3 rebuild` after an edit (unchanged memories copied from the old table, checked
against its slab; the changed ones encoded). tests/storage/test_bounded_scans.py holds single
scans to that; this builds a bank with the real stages and measures every process of the build.

How: two builds of the same corpus, model shape and stages in two fresh processes
(tests/storage/build_peaks.py), each with its own embedded Ray below it. They differ only in how
many tokens a memory keeps (model.mem_top_k 128 against 1): the wide bank's memories table is
hundreds of MB, the narrow one's 128 times smaller. A hard limit (RLIMIT_DATA/AS) does not fit:
torch and Ray reserve large virtual ranges (the encode stage segfaulted at 0.6 GB and hung at
1.0 GB), and a memory cgroup cannot be made here; so the peak resident set of every process is
measured instead (VmHWM of the driver and of every Ray process, reset at each stage and sampled
until it ends), per kind of process: the driver, the largest Ray worker, and each other Ray
process by its program (raylet, gcs_server, dashboard.py, ...).

The bound, derived: in each stage, a process of the wide build may peak above the same kind of
process in the same stage of the narrow build by less than half the wide memories table's size
on disk (its data files: zstd compresses the zero padding of short references, so the decoded
table is larger still). The driver lives through every stage and keeps the RSS a stage grew
to, so a later stage's driver inherits an earlier one's excess (the report prints what each
stage grew the driver by, for that). What a
stage is allowed beside the narrow build's peak is a few scanned batches (storage/bank.py:
batches of SCAN_BATCH_BYTES, at least 16 rows, and WIDE_SCAN's read-ahead) and one shard's memories (encode.refs_per_shard = 16
x 512 KiB); a stage that holds the table whole (`to_table()`, a scan that buffers every page)
adds at least the table, twice the bound.
"""

from __future__ import annotations

import json
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.conftest import ROOT

N_DOCS = 200  # long FOLDOC entries: 911 references, 456 MiB of wide memories (325 MiB on disk)


def _build(root, width: str) -> dict:
    out = subprocess.run(
        [sys.executable, "-m", "tests.storage.build_peaks", str(root / width), width, str(N_DOCS)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=900,
    )
    assert out.returncode == 0, out.stderr[-4000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def _mib(n: int) -> str:
    return f"{n / 2**20:,.0f} MiB"


@pytest.mark.slow
@pytest.mark.long  # two whole builds of ~900 references in parallel: a minute or more
def test_a_build_holds_no_process_a_whole_memories_table(tmp_path):
    with ThreadPoolExecutor(2) as pool:  # two processes: neither's peaks are the other's
        wide, narrow = pool.map(lambda w: _build(tmp_path, w), ["wide", "narrow"])
    assert wide["reencoded"] > 0 and wide["rows"] == narrow["rows"]  # the rebuild was incremental
    table = wide["table_disk_bytes"]
    bound = table / 2

    def peak(stage: dict, kind: str) -> int:
        """A kind's peak in a stage; a Ray process only one build had in that stage is compared
        with the other's largest Ray process."""
        return stage[kind] if kind in stage else max(v for k, v in stage.items() if k.startswith("ray:"))

    growth, lines = {}, []
    for name, w in wide["peaks"].items():
        n = narrow["peaks"][name]
        kinds = sorted({*w, *n} - {"driver_start"}, key=lambda k: (k.startswith("ray:"), k))
        for k in kinds:
            growth[name, k] = peak(w, k) - peak(n, k)
        lines.append(
            f"  {name}: driver started at {_mib(w['driver_start'])} ({_mib(n['driver_start'])}), grew in it "
            f"{_mib(w['driver'] - w['driver_start'])} ({_mib(n['driver'] - n['driver_start'])}); "
            + ", ".join(f"{k} {_mib(w.get(k, 0))} ({_mib(n.get(k, 0))})" for k in kinds)
        )
    top = sorted(growth.items(), key=lambda kv: -kv[1])[:4]
    report = "\n".join(
        [
            f"memories: {wide['rows']} rows x {wide['payload_bytes']:,} B = {_mib(wide['table_bytes'])} decoded, "
            f"{_mib(table)} on disk; the bound on a process's growth {_mib(bound)}",
            "largest growths (stage, kind), wide - narrow: " + ", ".join(f"{k} {_mib(v)}" for k, v in top),
            "peaks per stage, wide (narrow):",
            *lines,
            f"seconds: wide {wide['seconds']}, narrow {narrow['seconds']}",
        ]
    )
    print(report)
    over = {f"{s}/{k}": _mib(v) for (s, k), v in growth.items() if v >= bound}
    assert not over, f"a process grew with the memories table: {over}\n{report}"
