"""The encode job end to end: refs -> memories, versioned, resumable, bound to its model."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pytest
import torch

from jobs.config import load_config
from jobs.stages.encode import run_encode
from jobs.stages.ingest import run_ingest
from model import encode_references, load_model
from model.codecs import make_codec
from storage.bank import Bank, BankError
from storage.memory_store import MemoryStore
from storage.schemas import MEMORIES
from tests.conftest import ROOT, write_foldoc_corpus

pytestmark = pytest.mark.slow

TINY = ["model.preset=tiny", "model.vocab_size=600", "model.ref_max_tokens=128", "model.max_seq_len=512"]


def settings(corpus: Path, bank: Path, *extra: str) -> list[str]:
    return [
        f"corpus.paths=[{corpus}]",
        f"bank.uri={bank}",
        "corpus.records_per_shard=100",
        "tokenizer.vocab_size=600",
        "chunking.seq_len=256",
        "ray.num_cpus=2",
        *TINY,
        "encode.refs_per_shard=100",
        "encode.batch_size=16",
        *extra,
    ]


@pytest.fixture(scope="module")
def ingested(tmp_path_factory, ray_local):
    root = tmp_path_factory.mktemp("enc")
    corpus = write_foldoc_corpus(root / "c.jsonl.gz", 120, min_words=60)
    bank = root / "ingested"
    run_ingest(load_config("configs/demo.yaml", settings(corpus, bank)))
    return corpus, bank


def fresh_bank(ingested, tmp_path, name="bank") -> Path:
    dst = tmp_path / name
    shutil.copytree(ingested[1], dst)
    return dst


def memory_rows(bank: Path) -> list[dict]:
    rows = Bank(str(bank)).dataset("memories").to_table().to_pylist()
    return sorted(rows, key=lambda r: r["ref_id"])


@pytest.fixture(scope="module")
def encoded(ingested, tmp_path_factory):
    bank = fresh_bank(ingested, tmp_path_factory.mktemp("encoded"))
    cfg = load_config("configs/demo.yaml", settings(ingested[0], bank, "encode.codec=raw-fp32"))
    summary = run_encode(cfg)
    return cfg, bank, summary


def test_every_reference_gets_one_memory_with_lineage(encoded):
    cfg, bank, summary = encoded
    b = Bank(str(bank))
    refs = b.dataset("refs").to_table(columns=["ref_id", "content_hash"]).to_pylist()
    rows = memory_rows(bank)
    assert sorted(r["ref_id"] for r in refs) == [r["ref_id"] for r in rows]
    assert {r["ref_id"]: r["content_hash"] for r in refs} == {r["ref_id"]: r["content_hash"] for r in rows}
    m = cfg.model
    shape = [m.n_mem_layers, 2, m.n_kv_heads, m.mem_top_k, m.head_dim]
    assert all(r["shape"] == shape and len(r["payload"]) == 4 * torch.Size(shape).numel() for r in rows)
    meta = b.metadata("memories")
    assert meta["model_hash"] == summary["model_hash"] == rows[0]["model_hash"]
    assert meta["tokenizer_hash"] == b.metadata("refs")["tokenizer_hash"]
    assert meta["sparsity"] == {
        "top_k": m.mem_top_k,
        "score_combine": m.score_combine,
        "n_mem_layers": m.n_mem_layers,
        "ref_max_tokens": m.ref_max_tokens,
    }
    assert b.tags("memories") == {f"encode-{meta['encode_key']}": summary["version"]}


def test_fetched_memories_equal_a_fresh_encoding(encoded):
    cfg, bank, summary = encoded
    b = Bank(str(bank))
    model = load_model(b.metadata("memories")["model_dir"])
    refs = b.dataset("refs").to_table(columns=["ref_id", "token_ids"]).to_pylist()[:6]
    store = MemoryStore(b, summary["model_hash"], cache_size=4)
    mems, mask = store.fetch([r["ref_id"] for r in refs] + [refs[0]["ref_id"]])
    assert mems.shape[0] == 7 and torch.equal(mems[0], mems[6])  # repeats answered from one read
    for i, r in enumerate(refs):
        want = encode_references(model, torch.tensor([r["token_ids"]]))
        torch.testing.assert_close(mems[i], want.kv[0], rtol=1e-4, atol=1e-5)  # only batch padding differs
        assert torch.equal(mask[i], want.mask[0])
    assert len(store.cache) == 4 and store.misses == 6 and store.hits == 1


def test_rerun_with_same_inputs_does_no_work(encoded, capsys):
    cfg, bank, summary = encoded
    versions = Bank(str(bank)).table("memories").version
    assert run_encode(cfg)["status"] == "up_to_date"
    assert "nothing to do" in capsys.readouterr().out
    assert Bank(str(bank)).table("memories").version == versions


def test_other_model_is_refused_naming_both_hashes(encoded):
    _, bank, summary = encoded
    with pytest.raises(BankError, match=f"written by model {summary['model_hash']}, not by this model abc123"):
        MemoryStore(Bank(str(bank)), "abc123")


def test_killed_encode_resumes_to_identical_bytes(ingested, encoded, tmp_path):
    bank = fresh_bank(ingested, tmp_path)
    args = [sys.executable, "-m", "jobs", "encode", "-c", "configs/demo.yaml"]
    for s in settings(ingested[0], bank, "encode.codec=raw-fp32"):
        args += ["--set", s]
    env = dict(os.environ, M3_PROGRESS="0", M3_CRASH_AT="encode:1")
    proc = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 75, proc.stderr[-3000:]
    assert list((bank / "_staging").glob("encode-*/shards/*.parquet"))
    assert not Bank(str(bank)).has("memories")
    run_encode(load_config("configs/demo.yaml", settings(ingested[0], bank, "encode.codec=raw-fp32")))
    assert memory_rows(bank) == memory_rows(encoded[1])


def test_vq_codec_trains_stores_and_checks_its_quantizer(ingested, tmp_path):
    bank = fresh_bank(ingested, tmp_path)
    cfg = load_config("configs/demo.yaml", settings(ingested[0], bank, "encode.codec=vq", "encode.vq_train_refs=300"))
    summary = run_encode(cfg)
    b = Bank(str(bank))
    meta = b.metadata("memories")
    assert meta["codec"] == "vq" and Path(meta["quantizer_path"]).name == f"{meta['quantizer_hash']}.faiss"
    codec = make_codec("vq", quantizer=meta["quantizer_path"], quantizer_hash=meta["quantizer_hash"])
    rows = memory_rows(bank)
    assert all(len(r["payload"]) == codec.nbytes(r["shape"]) for r in rows)
    store = MemoryStore(b, summary["model_hash"])
    mems, _ = store.fetch([rows[0]["ref_id"]])
    assert torch.isfinite(mems).all()
    Path(meta["quantizer_path"]).unlink()
    with pytest.raises(BankError, match=f"quantizer {meta['quantizer_hash']}.*missing"):
        MemoryStore(b, summary["model_hash"])


def test_corrupt_payload_names_the_reference(encoded, tmp_path):
    _, bank, summary = encoded
    copy = tmp_path / "bank"
    shutil.copytree(bank, copy)
    b = Bank(str(copy))
    rows = b.dataset("memories").to_table().to_pylist()
    rows[3]["payload"] = rows[3]["payload"][:-5]
    b.write("memories", MEMORIES, pa.Table.from_pylist(rows, schema=MEMORIES).to_batches(), b.metadata("memories"))
    store = MemoryStore(b, summary["model_hash"])
    with pytest.raises(BankError, match=f"corrupt memory payload for reference '{rows[3]['ref_id']}'"):
        store.fetch([rows[3]["ref_id"]])


def test_encode_needs_refs(tmp_path):
    cfg = load_config("configs/demo.yaml", [f"bank.uri={tmp_path}", *TINY, "tokenizer.vocab_size=600"])
    with pytest.raises(BankError, match="no refs table: run `m3 ingest` first"):
        run_encode(cfg)
