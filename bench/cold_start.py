"""Cold start (paper §3.1): what the first retrieval of a cold reference costs (encode with the
serving model + write-back, storage/memory_store.py) against a stored fetch of the same references.

    .venv/bin/python bench/cold_start.py [--preset small] [--refs 640] [--batch 160] [--codec int8]

A bank of --refs random references of 128 tokens (no ingest: a refs table written directly) and an
untrained --preset model, encoded with `encode.cold: true` (no memory) and published. For each batch
of --batch distinct references (160 = 32 chunks × 5 memories, the paper's per-retrieval load), each
time through a new MemoryStore (empty RAM cache) given the model (as serving holds it):
- cold: the first fetch: encode + write back one file + decode;
- warm: the same references again: read from the written-back file + decode;
- stored: after `m3 encode` with cold off folds the written-back rows into `memories` (it
  reuses them all: nothing is encoded) and the build is published: a Lance take + decode.
Medians over the batches; wall clock, on whatever else shares the cores.
"""

from __future__ import annotations

import argparse
import hashlib
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import torch  # noqa: E402

from jobs.config import load_config  # noqa: E402
from jobs.stages.encode import run_encode  # noqa: E402
from model import Memory3, save_model  # noqa: E402
from model.checkpoint import saved_hash  # noqa: E402
from storage.bank import Bank  # noqa: E402
from storage.live import publish  # noqa: E402
from storage.memory_store import MemoryStore  # noqa: E402
from storage.schemas import REFS  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="small")
    ap.add_argument("--refs", type=int, default=640)
    ap.add_argument("--batch", type=int, default=160)
    ap.add_argument("--codec", default="int8")
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    root = Path(tempfile.mkdtemp(prefix="cold-bench-"))
    sets = [
        f"model.preset={a.preset}",
        f"bank.uri={root / 'bank'}",
        f"encode.codec={a.codec}",
        "model.ref_max_tokens=128",
    ]
    cfg = load_config(None, sets)
    torch.manual_seed(0)
    model = Memory3(cfg.model).eval()
    mdir = save_model(model, root / "model")
    sets.append(f"encode.checkpoint={mdir}")
    rng = np.random.default_rng(0)
    toks = [[int(t) for t in rng.integers(10, cfg.model.vocab_size, size=128)] for _ in range(a.refs)]
    ids = [f"d{i:05d}-0" for i in range(a.refs)]
    bank = Bank(str(root / "bank"))
    refs_v = bank.write(
        "refs",
        REFS,
        pa.table(
            {
                "ref_id": ids,
                "doc_id": [i[:6] for i in ids],
                "ordinal": [0] * a.refs,
                "start_token": [0] * a.refs,
                "n_tokens": [128] * a.refs,
                "text": ids,
                "token_ids": toks,
                "content_hash": [hashlib.sha256(str(t).encode()).hexdigest()[:16] for t in toks],
            },
            schema=REFS,
        ).to_batches(),
        {"ingest_key": "bench"},
    )
    quiet = lambda _: None  # noqa: E731
    out = run_encode(load_config(None, sets + ["encode.cold=true"]), note=quiet)
    publish(bank, {"refs": refs_v, "memories": out["version"]})
    h = saved_hash(mdir)
    batches = [ids[lo : lo + a.batch] for lo in range(0, a.refs, a.batch)]

    def timed(store_of, batch):
        store = store_of()
        t0 = time.perf_counter()
        store.fetch(batch)
        return time.perf_counter() - t0, store

    cold, warm = [], []
    for b in batches:
        t, s = timed(lambda: MemoryStore(Bank(bank.uri), h, model=model), b)
        assert s.encoded == len(b) and s.written_back == len(b)
        cold.append(t)
        t, s = timed(lambda: MemoryStore(Bank(bank.uri), h, model=model), b)
        assert s.encoded == 0 and s.warm_reads == len(b)
        warm.append(t)
    t0 = time.perf_counter()
    out = run_encode(load_config(None, sets), note=quiet)
    fold = time.perf_counter() - t0
    assert out["computed"] == 0 and out["unchanged"] == a.refs, out
    publish(bank, {"refs": refs_v, "memories": out["version"]})
    stored = []
    for b in batches:
        t, s = timed(lambda: MemoryStore(Bank(bank.uri), h, model=model), b)
        assert s.encoded == 0 and s.stored_reads == len(b)
        stored.append(t)
    c, w, st = (statistics.median(x) for x in (cold, warm, stored))
    print(
        f"model {a.preset} ({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params), codec {a.codec}, "
        f"{len(batches)} batches of {a.batch} references of 128 tokens, {a.threads} threads"
    )
    print(f"cold   (encode + write-back + decode): {c * 1e3:8.1f} ms/batch  {a.batch / c:8.0f} refs/s")
    print(f"warm   (written-back file + decode):   {w * 1e3:8.1f} ms/batch  {a.batch / w:8.0f} refs/s")
    print(f"stored (memories table + decode):      {st * 1e3:8.1f} ms/batch  {a.batch / st:8.0f} refs/s")
    print(f"first retrieval / stored fetch: {c / st:.1f}x   (/ written-back read: {c / w:.1f}x)")
    print(f"folding {a.refs} written-back rows into memories (m3 encode, nothing encoded): {fold:.2f} s")


if __name__ == "__main__":
    main()
