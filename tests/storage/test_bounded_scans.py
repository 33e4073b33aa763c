"""A scan of a table with wide rows (a memory per row) holds a few batches, not the table.

Lance's defaults (8,192 rows per batch, up to 2 GiB of reads buffered) made a scan of the memories
table hold all of it: `m3 bank stats` peaked at 2.9 GB on an 877 MB table. Each scan here runs in
its own process, whose peak RSS is compared with that of the same process scanning only the
narrow ref_id column: the difference must stay well under the table's size (it was several times
the size before `Bank` bounded its datasets' scans).
"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pytest

from storage.bank import LANCE_BATCH_ROWS, SCAN_BATCH_BYTES, Bank, batch_rows

ROWS, WIDTH = 3072, 128 << 10  # 384 MiB of payloads: 8,192 rows of it would be 1 GiB per batch

SCAN = r"""
import json, resource, sys
from storage.bank import Bank
from storage.sql import query
bank, what = Bank(sys.argv[1]), sys.argv[2]
if what == "ids":
    n = sum(b.num_rows for b in bank.dataset("wide").to_batches(columns=["ref_id"]))
elif what == "payload":
    n = sum(b.num_rows for b in bank.dataset("wide").to_batches(columns=["ref_id", "payload"]))
else:
    n = query(bank, "SELECT count(*), avg(octet_length(payload)) FROM wide")[1][0][0]
print(json.dumps({"rows": n, "peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss >> 10}))
"""


@pytest.fixture(scope="module")
def wide_bank(tmp_path_factory):
    bank = Bank(str(tmp_path_factory.mktemp("wide") / "bank"))
    rng = np.random.default_rng(0)  # random bytes: nothing for the file format to compress away
    schema = pa.schema([("ref_id", pa.string()), ("payload", pa.binary())])

    def batches():
        for lo in range(0, ROWS, 256):
            ids = [f"r{i:06d}" for i in range(lo, lo + 256)]
            payloads = [rng.bytes(WIDTH) for _ in ids]
            yield pa.RecordBatch.from_arrays([pa.array(ids), pa.array(payloads, pa.binary())], schema=schema)

    bank.write("wide", schema, batches(), {"stage": "test"})
    return bank


def _peak(bank: Bank, what: str) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", SCAN, bank.uri, what], capture_output=True, text=True, check=True, timeout=300
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_batch_rows_follow_the_row_width(wide_bank):
    ds = wide_bank.dataset("wide")
    rows = batch_rows(ds)
    assert rows * WIDTH <= 2 * SCAN_BATCH_BYTES and rows < LANCE_BATCH_ROWS
    assert max(b.num_rows for b in ds.to_batches(columns=["payload"])) <= rows  # the dataset's default
    narrow = Bank(wide_bank.uri)
    narrow.write("ids", pa.schema([("ref_id", pa.string())]), [pa.record_batch({"ref_id": ["a"] * 100})], {})
    assert batch_rows(narrow.dataset("ids")) == LANCE_BATCH_ROWS  # Lance's own default where rows are narrow


@pytest.mark.parametrize("what", ["payload", "sql"])
def test_a_scan_of_wide_rows_holds_a_few_batches(wide_bank, what):
    base, got = _peak(wide_bank, "ids"), _peak(wide_bank, what)
    assert got["rows"] == ROWS == base["rows"]
    table_mib = ROWS * WIDTH >> 20
    # the whole table held once would add table_mib; Lance's defaults added several times it
    assert got["peak_mib"] - base["peak_mib"] < table_mib / 2, (got, base, table_mib)
