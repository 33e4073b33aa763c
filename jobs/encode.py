"""`m3 encode`: every reference of the bank -> its explicit memory, in the `memories` table.

    python -m jobs encode -c configs/demo.yaml

A pool of Ray Data actors (one model each) encodes shards of the `refs` table; each shard lands
in a staging file, and the table gets one new version, tagged, when all are done. The key
covers the model hash, the refs version and the codec (with its quantizer): the same key is a
finished build ("nothing to do"); an unfinished one resumes from its staged shards.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import torch

from jobs.config import Config, config_hash
from jobs.report import Report
from jobs.runtime import init_ray, quiet_ray_data, row_shards, run_actor_shards
from model import Memory3, save_model
from model.checkpoint import memory_reading, saved_hash
from model.codecs import VQCodec, make_codec
from pipelines.encode_step import EncodeShards, encode_tokens, staged_path
from storage.bank import Bank, BankError
from storage.schemas import MEMORIES
from storage.staging import iter_batches, write_text_atomic
from storage.layout import BankLayout


def model_dir(cfg: Config, bank: Bank) -> Path:
    """The checkpoint to encode with: encode.checkpoint if set, else the bank's newest trained
    model (continual, else warmup: after training the bank must be re-encoded by the weights
    that will read it), else an untrained start, created once, reproducibly."""
    if cfg.encode.checkpoint:
        path = Path(cfg.encode.checkpoint)
        if not (path / "model.safetensors").exists():
            raise BankError(f"encode.checkpoint: {path} holds no model.safetensors")
        return path
    for stage in ("continual", "warmup"):
        trained = BankLayout(bank.uri).trained_model(stage)
        if (trained / "model.safetensors").exists():
            return trained
    path = BankLayout(bank.uri).models() / f"init-{config_hash(cfg.model)}-seed{cfg.encode.seed}"
    if not (path / "model.safetensors").exists():
        torch.manual_seed(cfg.encode.seed)
        save_model(Memory3(cfg.model), path)
    return path


def quantizer(cfg: Config, bank: Bank, mdir: Path, refs_uri: str, n_refs: int) -> dict:
    """Codec arguments; for "vq", train the quantizer on a uniform sample of memories first,
    once: a rerun or a resume finds it by what it was trained from."""
    if cfg.encode.codec != "vq":
        return {}
    qdir = BankLayout(bank.uri).quantizers()
    trained_from = config_hash({"model_hash": saved_hash(mdir), "refs_version": bank.table("refs").version,
                                "spec": cfg.encode.vq_spec, "seed": cfg.encode.seed, "n": cfg.encode.vq_train_refs})
    known = qdir / f"trained-from-{trained_from}.txt"
    if known.exists() and (qdir / f"{known.read_text().strip()}.faiss").exists():
        qhash = known.read_text().strip()
        return {"quantizer": str(qdir / f"{qhash}.faiss"), "quantizer_hash": qhash}
    from model import load_model

    model = load_model(mdir)
    rng = np.random.default_rng(cfg.encode.seed)
    rows = np.sort(rng.choice(n_refs, size=min(n_refs, cfg.encode.vq_train_refs), replace=False))
    import lance

    tokens = lance.dataset(refs_uri).take(rows, columns=["token_ids"]).column("token_ids").to_pylist()
    raw = make_codec("raw-fp32")
    m = model.config
    shape = (m.n_mem_layers, 2, m.n_kv_heads, m.mem_top_k, m.head_dim)
    vectors = []
    for lo in range(0, len(tokens), 64):
        payloads, _, _ = encode_tokens(model, raw, tokens[lo:lo + 64])
        mems = raw.decode_batch(payloads, shape).numpy()
        vectors.append(mems.reshape(-1, m.head_dim))
    vq = VQCodec.train(np.concatenate(vectors), spec=cfg.encode.vq_spec, seed=cfg.encode.seed)
    path = qdir / f"{vq.quantizer_hash}.faiss"
    if not path.exists():
        vq.save(path)
    write_text_atomic(known, vq.quantizer_hash)
    return {"quantizer": str(path), "quantizer_hash": vq.quantizer_hash}


def encode_key(cfg: Config, bank: Bank, mhash: str, codec_kw: dict) -> str:
    """What a memories table is a function of: same key, same table (the rebuild shares it, so
    `m3 encode` after a rebuild finds nothing to do)."""
    return config_hash({"model_hash": mhash, "refs": bank.metadata("refs").get("ingest_key"),
                        "refs_version": bank.table("refs").version, "codec": cfg.encode.codec,
                        "quantizer": codec_kw.get("quantizer_hash"), "batch_size": cfg.encode.batch_size,
                        "refs_per_shard": cfg.encode.refs_per_shard})


def memories_lineage(cfg: Config, key: str, mhash: str, mdir: Path, refs_meta: dict, codec_kw: dict) -> dict:
    return {"stage": "encode", "encode_key": key, "model_hash": mhash, "model_dir": str(mdir),
            "tokenizer_hash": refs_meta.get("tokenizer_hash"), "corpus_version": refs_meta.get("corpus_version"),
            "ingest_key": refs_meta.get("ingest_key"), "codec": cfg.encode.codec,
            "quantizer_hash": codec_kw.get("quantizer_hash"), "quantizer_path": codec_kw.get("quantizer"),
            "sparsity": sparsity(cfg), "trained_to_read": memory_reading(mdir), "config": cfg.as_dict()}


def sparsity(cfg: Config) -> dict:
    m = cfg.model
    return {"top_k": m.mem_top_k, "score_combine": m.score_combine, "n_mem_layers": m.n_mem_layers,
            "ref_max_tokens": m.ref_max_tokens}


def run_encode(cfg: Config) -> dict:
    report = Report("encode")
    bank = Bank(cfg.bank.uri)
    bank.require("refs")
    refs_meta = bank.metadata("refs")
    refs_ds = bank.dataset("refs")
    refs_uri, n_refs = refs_ds.uri, refs_ds.count_rows()
    mdir = model_dir(cfg, bank)
    mhash = saved_hash(mdir)
    codec_kw = quantizer(cfg, bank, mdir, refs_uri, n_refs)
    key = encode_key(cfg, bank, mhash, codec_kw)
    if bank.has("memories") and bank.metadata("memories").get("encode_key") == key:
        print(f"encode: memories in {cfg.bank.uri} are up to date for model {mhash[:12]} and codec "
              f"{cfg.encode.codec} (encode key {key}); nothing to do")
        return {"status": "up_to_date", "encode_key": key}

    stage_dir = BankLayout(cfg.bank.uri).staging(f"encode-{key}")
    shards = row_shards(n_refs, cfg.encode.refs_per_shard)
    todo = [s for s in shards if not staged_path(stage_dir, s[0]).exists()]
    report.set(references=n_refs, shards=len(shards), encode_key=key)
    init_ray(cfg.ray)
    quiet_ray_data()
    with report.stage("encode"):
        report.note(f"encode: model {mhash[:12]}, codec {cfg.encode.codec}, {len(shards) - len(todo)} of "
                    f"{len(shards)} shard(s) already done")
        e = cfg.encode
        run_actor_shards("encode", todo, EncodeShards, actors=e.actors, threads=e.threads_per_actor,
                         model_dir=str(mdir), codec=e.codec, codec_kw=codec_kw, refs_uri=refs_uri,
                         stage_dir=str(stage_dir), batch_size=e.batch_size)

    with report.stage("commit"):
        lineage = memories_lineage(cfg, key, mhash, mdir, refs_meta, codec_kw)
        version = bank.write("memories", MEMORIES, iter_batches([staged_path(stage_dir, s[0]) for s in shards]), lineage)
        bank.tag("memories", f"encode-{key}", version)
    shutil.rmtree(stage_dir, ignore_errors=True)
    summary = {**report.values, "version": version, "model_hash": mhash, "seconds": report.elapsed(),
               "refs_per_s": round(n_refs / max(report.stages.get("encode", 0), 1e-9), 1)}
    print(f"encode: {n_refs:,} memories ({cfg.encode.codec}) written as memories version {version} "
          f"in {summary['seconds']:.1f} s ({summary['refs_per_s']:,.0f} refs/s)")
    return summary
