"""`m3 run`: stage selection, and the whole pipeline end to end on a tiny model and real FOLDOC
(ingest -> warmup -> embed -> pair -> continual -> encode), ending in the run report."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from jobs.config import ConfigError
from jobs.ops.run import run_all, select, starts_ray_first
from jobs.models import stage_dir
from model.checkpoint import saved_hash
from storage.bank import Bank, BankError
from storage.memory_store import MemoryStore
from tests.conftest import write_foldoc_corpus
from tests.jobs.training.test_trainer import config


def test_stage_selection():
    names = [n for n, _ in select()]
    assert names == ["ingest", "warmup", "embed", "pair", "continual", "encode", "publish", "evaluate"]
    assert [n for n, _ in select(start="pair")][:3] == ["pair", "continual", "encode"]
    assert [n for n, _ in select(only="encode,warmup")] == ["warmup", "encode"]  # pipeline order
    with pytest.raises(ConfigError, match="unknown stage.*stages are ingest, warmup"):
        select(only="warmup,finetune")
    with pytest.raises(ConfigError, match="--from"):
        select(start="nope")


def test_ray_starts_once_with_its_dashboard_when_a_later_stage_needs_it():
    assert starts_ray_first([n for n, _ in select()])
    assert starts_ray_first(["ingest", "embed"])
    assert not starts_ray_first(["ingest"])  # ingest's own bare start is the cheaper one
    assert not starts_ray_first(["ingest", "publish", "evaluate"])
    assert not starts_ray_first(["embed", "pair"])  # each stage starts what it needs


@pytest.mark.slow
def test_whole_pipeline_then_a_rerun_does_nothing(tmp_path, ray_local, capsys, monkeypatch):
    corpus = write_foldoc_corpus(tmp_path / "c.jsonl.gz", 120, min_words=60)
    monkeypatch.chdir(tmp_path)  # a relative bank path, as in the demo: Ray Train workers run elsewhere
    cfg = config(corpus, Path("bank"), "train.warmup_stage_steps=4", "train.continual_stage_steps=4",
                 "train.checkpoint_every=4", "train.lr_warmup_steps=1", "train.cpus_per_worker=0.5",
                 "train.max_tokens=192", "train.eval_sequences=4", "pair.max_tokens=192",
                 "model.max_seq_len=1024", "infer.eval.sequences=4", "infer.eval.probe_refs=4", "train.evidence=true")
    out = run_all(cfg)
    report = (tmp_path / "bank" / "_reports" / "run.md").read_text()
    for stage in ("ingest", "warmup", "embed", "pair", "continual", "encode", "evaluate"):
        assert f"| {stage} |" in report
    assert "## Held-out evidence at the end of training" in report and "continual model, with memory" in report
    assert "## Does memory help? The served bank" in report and "## Sample generation, with and without memory" in report
    assert "| with memory | without memory |" in report
    ev = out["stages"]["evaluate"]
    assert {"none", "memory", "rag", "memory, dense raw (same references)"} <= set(ev["modes"])
    assert all(m["tokens"] > 0 for m in ev["modes"].values()) and ev["sink"] is True
    sample, plain = ev["sample"], ev["sample_none"]
    assert sample["model_hash"] == saved_hash(stage_dir(cfg, "continual") / "model") and sample["chunks"]
    assert sample["prompt"] == plain["prompt"] and plain["mode"] == "none" and not plain["chunks"]
    if ev["probe"].get("prompts"):  # the side-by-side prompt is a probe term: its entry only the bank holds
        assert sample["prompt"] in ev["probe"]["prompts"]
    ev = out["stages"]["continual"]["evidence"]
    assert ev["continual_loss_memory"] is not None and ev["tokens"] > 0

    # the bank ends encoded by the continual model, and refuses the warmup model
    bank = Bank(cfg.bank.uri)
    continual = saved_hash(stage_dir(cfg, "continual") / "model")
    assert bank.metadata("memories")["model_hash"] == continual
    assert len(MemoryStore(bank, continual)) == bank.dataset("refs").count_rows()
    with pytest.raises(BankError, match="re-encode"):
        MemoryStore(bank, saved_hash(stage_dir(cfg, "warmup") / "model"))
    saved = json.loads((tmp_path / "bank" / "_reports" / "run.json").read_text())
    assert saved["stages"]["pair"]["with_neighbor"] > 0

    capsys.readouterr()
    again = run_all(cfg, only="ingest,embed,pair,encode")
    assert all(r.get("status") == "up_to_date" for r in again["stages"].values()), again["stages"]

