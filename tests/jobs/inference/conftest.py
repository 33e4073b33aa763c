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


@pytest.fixture(scope="session")
def edited_facts_bank(tmp_path_factory, ray_local):
    """A slice of the facts corpus (tests/conftest.py facts_subset, plus the descriptions of the
    entities data/facts/edits.jsonl edits) published as build 1 by `m3 rebuild`, encoded by a
    tiny reader model saved as training saves one (encode.checkpoint; infer.checkpoint unset, so
    serving finds it through the memories' lineage); then the edits applied to a copy of the bank
    file (scripts/make_facts.py apply_edits) and an incremental rebuild published as build 2.
    Returns a namespace: cfg (build 1's corpus), cfg2 (the edited corpus) and sets2 (its --set
    overrides), ckpt, edits (those of the slice), rebuilds (their summaries), root, settings(bank
    file, *extra) and config(bank file, *extra)."""
    import gzip
    import importlib.util
    import types

    from jobs.config import load_config
    from jobs.ops.rebuild import run_rebuild
    from model import Memory3, save_model
    from tests.conftest import FACTS, ROOT, facts_subset

    spec = importlib.util.spec_from_file_location("make_facts", ROOT / "scripts" / "make_facts.py")
    make_facts = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make_facts)
    root = tmp_path_factory.mktemp("edits")
    bank_file, train_file, _ = facts_subset(root)
    edits = make_facts.read_jsonl(FACTS / "edits.jsonl")
    ids = {e["id"] for e in edits}
    rows = make_facts.read_jsonl(bank_file) + [
        r for r in make_facts.read_jsonl(FACTS / "bank.jsonl.gz") if r["id"] in ids
    ]
    with gzip.open(bank_file, "wt", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)

    def settings(bank: Path, *extra: str) -> list[str]:  # --set overrides of configs/facts.yaml
        return [
            f"corpus.paths=[{bank}, {train_file}]",
            f"corpus.roles={{{bank}: bank, {train_file}: training}}",
            f"bank.uri={root / 'bank'}",
            "tokenizer.vocab_size=600",
            "model.vocab_size=600",
            "ray.num_cpus=2",
            "corpus.records_per_shard=100",
            "retrieval.refs_per_shard=64",
            "retrieval.threads_per_actor=1",
            *FACTS_TINY,
            *extra,
        ]

    def config(bank: Path, *extra: str):
        return load_config("configs/facts.yaml", settings(bank, *extra))

    torch.manual_seed(0)
    ckpt = save_model(Memory3(dataclasses.replace(config(bank_file).model, init_std=0.2)), root / "reader")
    write_export(config(bank_file), ckpt)
    cfg = config(bank_file, f"encode.checkpoint={ckpt}")
    first = run_rebuild(cfg)
    edited, n = make_facts.apply_edits(edits, bank_file, root / "edited")
    assert n == len(edits)
    cfg2 = config(edited, f"encode.checkpoint={ckpt}")
    second = run_rebuild(cfg2)
    return types.SimpleNamespace(
        cfg=cfg,
        cfg2=cfg2,
        sets2=settings(edited, f"encode.checkpoint={ckpt}"),
        ckpt=Path(ckpt),
        edits=edits,
        rebuilds=(first, second),
        root=root,
        settings=settings,
        config=config,
    )
