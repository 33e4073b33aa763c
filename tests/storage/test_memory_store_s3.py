"""The MemoryStore and its cold write-back (storage/memory_store.py, storage/warm.py) on a bank
at an s3:// URI (the S3 server of the `s3` fixture): a cold reference is encoded on its first
fetch and written back under `<bank>/_warm/` in the bucket, served the same as from a bank at a
local path, read back by a reopened store, and reused by the next encode. The banks are those of
tests/storage/test_cold_start.py (no Ray: a cold encode computes nothing, the delta is one shard)."""

from __future__ import annotations

import torch

from jobs.stages.encode import run_encode
from model.checkpoint import saved_hash
from storage.bank import Bank
from storage.live import publish
from storage.memory_store import MemoryStore
from storage.schemas import REFS
from storage.warm import warm_files
from tests.storage.test_cold_start import N, config, model_dir, refs_table

IDS = ["d03-0", "d07-0", "d01-0", "d11-0", "d05-0"]


def cold(uri: str, mdir):
    bank = Bank(uri)
    refs_v = bank.write("refs", REFS, refs_table().to_batches(), {"ingest_key": "k1"})
    out = run_encode(config(uri, mdir, "encode.cold=true"), note=lambda _: None)
    publish(bank, {"refs": refs_v, "memories": out["version"]})
    return Bank(uri, live=True)


def test_cold_fetch_on_s3_writes_back_to_the_bucket_and_serves_what_a_local_bank_serves(s3, tmp_path):
    mdir = model_dir(tmp_path, 0)
    remote, local = cold(f"{s3[0]}/warm-{tmp_path.name}", mdir), cold(str(tmp_path / "bank"), mdir)
    store = MemoryStore(remote, saved_hash(mdir))
    mems, masks = store.fetch(IDS)
    assert (store.encoded, store.written_back) == (5, 5)
    files = warm_files(remote, store.warm_key)
    assert len(files) == 1 and str(files[0]).startswith(f"{remote.uri}/_warm/{store.warm_key}/")
    want, want_masks = MemoryStore(local, saved_hash(mdir)).fetch(IDS)
    assert torch.equal(mems, want) and torch.equal(masks, want_masks)
    # a store opened later reads the written-back rows from the bucket instead of encoding
    reopened = MemoryStore(Bank(remote.uri, live=True), saved_hash(mdir))
    again, _ = reopened.fetch(IDS)
    assert torch.equal(again, mems) and reopened.encoded == 0 and reopened.warm_reads == 5
    # the next encode of the s3 bank copies them and computes only the rest
    out = run_encode(config(remote.uri, mdir), note=lambda _: None)
    assert out["status"] == "built" and out["computed"] == N - 5 and out["unchanged"] == 5
