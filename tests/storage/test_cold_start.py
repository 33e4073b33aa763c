"""Cold start (paper §3.1): a bank whose references have no memory yet (`encode.cold: true`); the
serving MemoryStore encodes a cold reference on its first fetch, with the bank's model, codec and
sparsity, serves it and writes it back (storage/warm.py); later reads and the next encode reuse it.

Tiny real banks: a refs table written with Bank.write, an untrained tiny Memory3 saved with
save_model, the encode stage run in-process (cold: nothing to compute, so no Ray), and the
stored encoding made by the encode stage's own EncodeShards, called directly."""

from __future__ import annotations

import dataclasses
import hashlib
import os

import numpy as np
import pyarrow as pa
import pytest
import torch

from jobs.config import load_config
from jobs.ops.bank_stats import bank_stats, render
from jobs.ops.lock import BankLock
from jobs.stages.encode import run_encode
from model import Memory3, save_model
from model.checkpoint import saved_hash
from pipelines.encode_step import EncodeShards
from pipelines.shard_actor import staged_path
from storage.bank import Bank, BankError
from storage.layout import MANIFEST
from storage.live import publish
from storage.memory_store import MemoryStore
from storage.schemas import REFS
from storage.staging import read_table
from storage.warm import warm_files

N = 14
BASE = [
    "model.preset=tiny",
    "model.vocab_size=600",
    "tokenizer.vocab_size=600",
    "model.ref_max_tokens=128",
    "model.max_seq_len=512",
    "model.mem_top_k=8",
    "encode.codec=raw-fp32",
    "encode.batch_size=4",
]


def refs_table(n: int = N, seed: int = 0) -> pa.Table:
    rng = np.random.default_rng(seed)
    toks = [[int(t) for t in rng.integers(10, 590, size=int(k))] for k in rng.integers(2, 70, size=n)]
    ids = [f"d{i:02d}-0" for i in range(n)]
    return pa.table(
        {
            "ref_id": ids,
            "doc_id": [i.split("-")[0] for i in ids],
            "ordinal": [0] * n,
            "start_token": [0] * n,
            "n_tokens": [len(t) for t in toks],
            "text": ids,
            "token_ids": toks,
            "content_hash": [hashlib.sha256(str(t).encode()).hexdigest()[:16] for t in toks],
        },
        schema=REFS,
    )


def model_dir(root, seed: int):
    torch.manual_seed(seed)
    cfg = load_config(None, BASE).model
    return save_model(Memory3(dataclasses.replace(cfg, init_std=0.2)), root / f"model{seed}")


def config(bank, mdir, *extra):
    return load_config(None, [*BASE, f"bank.uri={bank}", f"encode.checkpoint={mdir}", *extra])


@pytest.fixture()
def cold_bank(tmp_path):
    """A published build: N references, a memories table encoded cold (no row)."""
    bank = Bank(str(tmp_path / "bank"))
    refs_v = bank.write("refs", REFS, refs_table().to_batches(), {"ingest_key": "k1"})
    mdir = model_dir(tmp_path, 0)
    cfg = config(bank.uri, mdir, "encode.cold=true")
    out = run_encode(cfg, note=lambda _: None)
    publish(bank, {"refs": refs_v, "memories": out["version"]})
    return cfg, bank, mdir, out


def stored_encoding(cfg, mdir, tmp_path, batch_size=5) -> dict[str, dict]:
    """What `m3 encode` stores for every reference: EncodeShards (the stage's actor), called here
    with another batch size than the store's, over all references in one shard."""
    bank = Bank(cfg.bank.uri)
    actor = EncodeShards(
        model_dir=str(mdir),
        codec="raw-fp32",
        codec_kw={},
        input_uri=bank.dataset("refs").uri,
        stage_dir=str(tmp_path / "stage"),
        batch_size=batch_size,
        threads=1,
    )
    actor({"shard": [0], "start": [0], "end": [N]})
    return {r["ref_id"]: r for r in read_table(staged_path(tmp_path / "stage", 0)).to_pylist()}


def warm_rows(bank_uri: str) -> dict[str, dict]:
    return {r["ref_id"]: r for f in warm_files(Bank(bank_uri), _key(bank_uri)) for r in read_table(f).to_pylist()}


def _key(bank_uri):
    from storage.warm import key_of

    return key_of(Bank(bank_uri).metadata("memories"))


def test_cold_encode_writes_the_lineage_and_no_memory(cold_bank):
    cfg, bank, mdir, out = cold_bank
    meta = bank.metadata("memories")
    assert out["status"] == "built" and out["cold"] == N and out["computed"] == 0
    assert bank.dataset("memories").count_rows() == 0
    assert meta["cold"] is True and meta["model_hash"] == saved_hash(mdir) and meta["codec"] == "raw-fp32"
    assert run_encode(cfg, note=lambda _: None)["status"] == "up_to_date"


def test_first_fetch_encodes_equal_to_the_stored_encoding_then_reads_storage(cold_bank, tmp_path):
    cfg, bank, mdir, _ = cold_bank
    ids = ["d03-0", "d07-0", "d01-0", "d11-0", "d05-0"]
    store = MemoryStore(bank, saved_hash(mdir), cache_size=2)
    assert len(store) == 0 and store.shape == (1, 2, 2, 8, 8)
    mems, masks = store.fetch(ids)
    assert (store.encoded, store.written_back, store.warm_reads) == (5, 5, 0)
    # byte-identical to what the encode stage stores (its actor, in other batches)
    stored, warm = stored_encoding(cfg, mdir, tmp_path), warm_rows(bank.uri)
    assert sorted(warm) == sorted(ids)
    for r in ids:
        for col in ("payload", "positions", "n_tokens", "content_hash", "model_hash", "shape"):
            assert warm[r][col] == stored[r][col], (r, col)
    # served = what a stored fetch decodes
    assert torch.equal(mems, store.codec.decode_batch([stored[r]["payload"] for r in ids], store.shape))
    assert masks.sum(1).tolist() == [stored[r]["n_tokens"] for r in ids]
    # a second read: the 2 the RAM cache holds are hits, the other 3 read the written-back rows
    again, _ = store.fetch(ids)
    assert torch.equal(again, mems) and store.encoded == 5 and (store.hits, store.warm_reads) == (2, 3)
    assert len(warm_files(bank, store.warm_key)) == 1  # one write-back per fetch


def test_write_back_survives_reopening_and_the_next_encode_reuses_it(cold_bank, tmp_path):
    cfg, bank, mdir, _ = cold_bank
    ids = ["d02-0", "d09-0", "d04-0"]
    first, _ = MemoryStore(bank, saved_hash(mdir)).fetch(ids)
    reopened = MemoryStore(Bank(bank.uri), saved_hash(mdir))
    got, _ = reopened.fetch(ids)
    assert torch.equal(got, first) and reopened.encoded == 0 and reopened.warm_reads == 3
    # cold off: the encode stage copies the written-back rows and encodes only the rest
    # (one shard of the delta: in process, no Ray)
    out = run_encode(config(bank.uri, mdir), note=lambda _: None)
    assert out["status"] == "built" and out["computed"] == N - 3 and out["unchanged"] == 3
    rows = {r["ref_id"]: r for r in bank.dataset("memories").to_table().to_pylist()}
    stored = stored_encoding(cfg, mdir, tmp_path)
    assert sorted(rows) == sorted(stored)
    assert all(rows[r]["payload"] == stored[r]["payload"] for r in rows)
    full = MemoryStore(Bank(bank.uri), saved_hash(mdir), version=out["version"])  # the new (unpublished) build
    assert len(full) == N and torch.equal(full.fetch(ids)[0], first) and full.encoded == 0


def test_a_store_of_another_model_refuses_and_never_reads_its_write_backs(cold_bank, tmp_path):
    cfg, bank, mdir, _ = cold_bank
    MemoryStore(bank, saved_hash(mdir)).fetch(["d01-0", "d02-0"])
    other = model_dir(tmp_path, 1)
    with pytest.raises(BankError, match="not by this model"):
        MemoryStore(bank, saved_hash(other))
    # the bank re-encoded (cold) for model B: B's store encodes with B, reads none of A's rows
    run_encode(config(bank.uri, other, "encode.cold=true"), note=lambda _: None)
    b = MemoryStore(Bank(bank.uri), saved_hash(other), version=Bank(bank.uri).table("memories").version)
    mems, _ = b.fetch(["d01-0", "d02-0"])
    assert b.encoded == 2 and b.warm_reads == 0
    a_rows = warm_rows(bank.uri)  # now B's key
    assert {r["model_hash"] for r in a_rows.values()} == {saved_hash(other)}
    # and a store of B never serves A's rows: A's bytes differ
    a = MemoryStore(bank, saved_hash(mdir))  # bank's live build is still A's
    assert not torch.equal(a.fetch(["d01-0"])[0], mems[:1]) and a.encoded == 0


def test_write_back_under_the_rebuild_lock_touches_no_live_table(cold_bank):
    cfg, bank, mdir, _ = cold_bank

    def snapshot():
        root = bank.uri
        files = {os.path.relpath(os.path.join(d, f), root) for d, _, fs in os.walk(root) for f in fs}
        return {f for f in files if not f.startswith("_warm/")}, open(os.path.join(root, MANIFEST)).read()

    before = snapshot()
    versions = {t: bank.table(t).version for t in ("refs", "memories")}
    with BankLock(bank, "rebuild"):
        store = MemoryStore(bank, saved_hash(mdir))
        store.fetch(["d06-0", "d08-0"])
        after = snapshot()
    assert store.written_back == 2
    lock_file = {"_rebuild.lock"}
    assert after[0] - lock_file == before[0] and after[1] == before[1]  # only _warm/ gained files
    assert {t: bank.table(t).version for t in ("refs", "memories")} == versions
    assert bank.dataset("memories").count_rows() == 0


def test_stats_count_warm_and_cold(cold_bank):
    cfg, bank, mdir, _ = cold_bank
    mem = bank_stats(bank)["memories"]
    assert (mem["refs"], mem["warm"], mem["cold"]) == (N, 0, N)
    MemoryStore(bank, saved_hash(mdir)).fetch(["d00-0", "d10-0", "d12-0"])
    mem = bank_stats(bank)["memories"]
    assert (mem["warm"], mem["warm_stored"], mem["warm_written_back"], mem["cold"]) == (3, 0, 3, N - 3)
    assert f"warm 3 of {N} refs (0 in memories, 3 written back at serving), cold {N - 3}" in render(bank_stats(bank))


def test_encoding_is_batch_invariant(tmp_path):
    """The bytes of a reference alone equal its bytes in any batch (model/ref_batches.py encodes
    each reference at its own width, whatever the longest reference beside it). The demo's model:
    padded to the batch's longest reference, a third of these differed on an AMD EPYC."""
    from model.codecs import make_codec
    from model.ref_batches import encode_tokens

    torch.manual_seed(0)
    model, codec = Memory3(load_config("configs/demo.yaml", []).model).eval(), make_codec("raw-fp32")
    rng = np.random.default_rng(5)
    R = model.config.ref_max_tokens
    toks = [[int(t) for t in rng.integers(10, 590, size=int(k))] for k in rng.integers(1, R + 1, size=48)]
    alone = [encode_tokens(model, codec, [t])[0][0] for t in toks]
    order = sorted(range(len(toks)), key=lambda i: len(toks[i]))
    for size in (3, 16, 48):
        for lo in range(0, len(toks), size):
            idx = order[lo : lo + size] if size != 16 else list(range(lo, min(lo + size, len(toks))))
            batch = encode_tokens(model, codec, [toks[i] for i in idx])[0]
            assert [alone[i] for i in idx] == batch, (size, lo)
