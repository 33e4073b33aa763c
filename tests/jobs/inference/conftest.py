"""One real bank for the inference tests (FOLDOC entries, real LanceDB and retrieval), read by a
tiny model saved the way the trainer saves a continual model: weights by `save_model`, and an
export.json whose `memory` section is the trainer's own `trained_to_read` (it reads memories,
behind the ref_bos sink, at the bank's sparsity and codec, on the serving schedule). Its
memories are encoded into the bank by that model.

Large random weights (init_std 0.2): attention far from uniform, so what a memory holds, or the
sink, moves the logits and the greedy tokens; a test of either then fails if it is lost."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

# tiny model: 16-token chunks, 2 memories per chunk, so a short generation crosses many swaps
TINY = [
    "model.preset=tiny",
    "model.vocab_size=600",
    "model.ref_max_tokens=128",
    "model.max_seq_len=512",
    "encode.codec=raw-fp32",
    "train.heldout_fraction=0.3",
    "infer.eval.sequences=6",
    "infer.eval.tokens=96",
    "infer.eval.probe_refs=4",
    "infer.eval.batch_size=2",
]


def write_export(cfg, directory: Path, stage: str = "continual", train=None, **memory) -> Path:
    """export.json beside a saved model, as jobs/training/trainer.save_checkpoint writes it (the
    `memory` section from trained_to_read with `train`, default cfg.train on the serving
    schedule, the one inference serves on; `memory` overrides some of its keys)."""
    from jobs.training.trainer import trained_to_read
    from model.checkpoint import saved_hash

    tc = train or dataclasses.replace(cfg.train, memory_schedule="serving")
    reading = {**trained_to_read(cfg, tc, stage), **memory}
    info = {
        "stage": stage,
        "step": 1,
        "memory": reading,
        "train": dataclasses.asdict(tc),
        "model_hash": saved_hash(directory),
    }
    (Path(directory) / "export.json").write_text(json.dumps(info, indent=2))
    return Path(directory)


@pytest.fixture(scope="session")
def reader_bank(tmp_path_factory, ray_local):
    """(config, its --set overrides): the bank, encoded by the reader model it serves."""
    from jobs.config import load_config
    from jobs.stages.encode import run_encode
    from model import Memory3, save_model
    from tests.conftest import small_embedded_bank

    root = tmp_path_factory.mktemp("reader")
    cfg, overrides, _ = small_embedded_bank(root, *TINY)
    torch.manual_seed(0)
    ckpt = save_model(Memory3(dataclasses.replace(cfg.model, init_std=0.2)), root / "reader")
    write_export(cfg, ckpt)
    overrides = [*overrides, f"encode.checkpoint={ckpt}", f"infer.checkpoint={ckpt}"]
    cfg = load_config("configs/demo.yaml", overrides)
    run_encode(cfg)
    return cfg, overrides


@pytest.fixture(scope="session")
def facts_bm25_bank(tmp_path_factory, ray_local):
    """(config, entity id -> name): a slice of the facts corpus (invented names) embedded for
    retrieval.method bm25 (vectors, the references' text and its full-text index)."""
    from tests.conftest import small_facts_bank

    cfg, _, names = small_facts_bank(tmp_path_factory.mktemp("facts-bm25"), "retrieval.method=bm25")
    return cfg, names


# a facts bank small enough to rebuild twice in a test: the tiny model, full-precision memories
FACTS_TINY = [
    "model.preset=tiny",
    "model.ref_max_tokens=128",
    "model.max_seq_len=512",
    "encode.codec=raw-fp32",
    "encode.refs_per_shard=64",
    "encode.batch_size=16",
    "infer.batch_size=4",
]
