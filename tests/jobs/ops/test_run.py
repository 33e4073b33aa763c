"""`m3 run`: stage selection, and the whole pipeline end to end on a tiny model and real FOLDOC
(ingest -> warmup -> embed -> pair -> continual -> encode), ending in the run report."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from jobs.config import ConfigError, load_config
from jobs.ops.run import run_all, select, starts_ray_first
from model.checkpoint import saved_hash
from storage.bank import Bank, BankError
from storage.memory_store import MemoryStore
from tests.conftest import write_foldoc_corpus
from tests.jobs.training.test_trainer import config


def test_stage_selection():
    names = [n for n, _ in select()]
    assert names == ["ingest", "warmup", "embed", "pair", "continual", "control", "encode", "publish", "evaluate"]
    assert [n for n, _ in select(start="pair")][:4] == ["pair", "continual", "control", "encode"]
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
    cfg = config(
        corpus,
        Path("bank"),
        "train.warmup_stage_steps=4",
        "train.continual_stage_steps=4",
        "train.checkpoint_every=4",
        "train.lr_warmup_steps=1",
        "train.cpus_per_worker=0.5",
        "train.max_tokens=192",
        "train.eval_sequences=4",
        "pair.max_tokens=192",
        "model.max_seq_len=1024",
        "infer.eval.sequences=4",
        "infer.eval.probe_refs=4",
        "train.evidence=true",
    )
    out = run_all(cfg)
    report = (tmp_path / "bank" / "_reports" / "run.md").read_text()
    for stage in ("ingest", "warmup", "embed", "pair", "continual", "encode", "evaluate"):
        assert f"| {stage} |" in report
    assert "## Held-out evidence at the end of training" in report and "continual model, with memory" in report
    assert (
        "## Does memory help? The served bank" in report and "## Sample generation, with and without memory" in report
    )
    assert "| with memory | without memory |" in report
    ev = out["stages"]["evaluate"]
    assert {"none", "memory", "rag", "memory, dense raw (same references)"} <= set(ev["modes"])
    assert all(m["tokens"] > 0 for m in ev["modes"].values()) and ev["sink"] is True
    sample, plain = ev["sample"], ev["sample_none"]
    assert sample["model_hash"] == saved_hash(Bank.of(cfg).trained_model("continual")) and sample["chunks"]
    assert sample["prompt"] == plain["prompt"] and plain["mode"] == "none" and not plain["chunks"]
    if ev["probe"].get("prompts"):  # the side-by-side prompt is a probe term: its entry only the bank holds
        assert sample["prompt"] in ev["probe"]["prompts"]
    ev = out["stages"]["continual"]["evidence"]
    assert ev["continual_loss_memory"] is not None and ev["tokens"] > 0

    # the bank ends encoded by the continual model, and refuses the warmup model
    bank = Bank(cfg.bank.uri)
    continual = saved_hash(Bank.of(cfg).trained_model("continual"))
    assert bank.metadata("memories")["model_hash"] == continual
    assert len(MemoryStore(bank, continual)) == bank.dataset("refs").count_rows()
    with pytest.raises(BankError, match="re-encode"):
        MemoryStore(bank, saved_hash(Bank.of(cfg).trained_model("warmup")))
    saved = json.loads((tmp_path / "bank" / "_reports" / "run.json").read_text())
    assert saved["stages"]["pair"]["with_neighbor"] > 0

    capsys.readouterr()
    again = run_all(cfg, only="ingest,embed,pair,encode")
    assert all(r.get("status") == "up_to_date" for r in again["stages"].values()), again["stages"]


# -- `m3 run` publishes through the rebuild's policy (issue 27) -------------------------------


def fake_build(path: Path, n_refs: int, key: str, salt: str = "") -> dict[str, int]:
    """Every table `m3 run` publishes, of one ingest `key`, with n_refs references (no Ray)."""
    import pyarrow as pa

    from storage.schemas import MEMORIES, REFS
    from tests.storage.banks import memories, refs

    bank, lineage = Bank(str(path)), {"ingest_key": key}
    rows = {f"d{i}-0": f"h{i}{salt}" for i in range(n_refs)}
    versions = {}
    for name in ("documents", "rejects", "train_sequences", "embeddings"):
        t = pa.table({"ref_id": pa.array(sorted(rows), pa.string())})
        versions[name] = bank.write(name, t.schema, t.to_batches(), lineage)
    versions["refs"] = bank.write("refs", REFS, refs(rows).to_batches(), lineage)
    versions["memories"] = bank.write(
        "memories",
        MEMORIES,
        memories({r: ("m1", b"p") for r in rows}).to_batches(),
        {**lineage, "encode_key": f"encode-{key}"},
    )
    return versions


def run_args(bank: Path, *extra: str) -> list[str]:
    return ["run", "--only", "publish", "--set", f"bank.uri={bank}", *extra]


def test_run_publishes_the_versions_its_stages_built(tmp_path, monkeypatch):
    import jobs.ops.run as run_mod
    from storage.live import live_versions

    bank = tmp_path / "bank"

    def ingest(cfg):  # a stage of this run, then a writer that takes no lock writes refs again
        built = fake_build(bank, 10, "two")
        fake_build(bank, 10, "two", salt="foreign")
        return {"versions": built}

    monkeypatch.setattr(run_mod, "STAGES", [("ingest", ingest) if n == "ingest" else (n, f) for n, f in run_mod.STAGES])
    out = run_all(load_config(None, [f"bank.uri={bank}"]), only="ingest,publish")
    built = out["stages"]["ingest"]["versions"]
    assert live_versions(Bank(str(bank))) == built == out["stages"]["publish"]["versions"]
    assert Bank(str(bank)).table("refs").version > built["refs"]  # the later write is not live


def test_run_refuses_to_publish_a_build_far_smaller_than_the_live_one(tmp_path, capsys):
    from jobs.cli.main import main
    from storage.live import live_versions

    bank = tmp_path / "bank"
    fake_build(bank, 20, "one")
    assert main(run_args(bank)) == 0
    live = live_versions(Bank(str(bank)))
    fake_build(bank, 2, "two")  # a corpus cut to 10 %
    capsys.readouterr()
    assert main(run_args(bank)) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "the live build has 20 references, this one would have 2" in err, err
    assert "nothing was published" in err and "--allow-shrink" in err and "rebuild.max_shrink" in err, err
    assert live_versions(Bank(str(bank))) == live
    assert main(run_args(bank, "--allow-shrink")) == 0
    assert Bank(str(bank), live=True).dataset("refs").count_rows() == 2


def test_run_never_publishes_a_build_without_references(tmp_path, capsys):
    from jobs.cli.main import main
    from storage.live import read_manifest

    bank = tmp_path / "bank"
    fake_build(bank, 0, "none")
    assert main(run_args(bank, "--allow-shrink")) == 2
    assert "0 references" in capsys.readouterr().err and read_manifest(Bank(str(bank))) is None


def test_run_publish_applies_retention_and_refuses_a_build_published_meanwhile(tmp_path, monkeypatch):
    import lance

    import jobs.ops.run as run_mod
    from storage.live import PublishConflict, live_versions, publish

    bank = tmp_path / "bank"
    one = fake_build(bank, 5, "one")
    assert run_all(load_config(None, [f"bank.uri={bank}", "rebuild.keep_builds=1"]), only="publish")
    two = fake_build(bank, 5, "two", salt="2")
    run_all(load_config(None, [f"bank.uri={bank}", "rebuild.keep_builds=1"]), only="publish")
    versions = [v["version"] for v in lance.dataset(str(bank / "refs.lance")).versions()]
    assert one["refs"] not in versions and two["refs"] in versions  # retention: keep_builds=1

    def ingest(cfg):  # another publisher (a compaction that took no lock) publishes during the run
        built = fake_build(bank, 5, "three", salt="3")
        publish(Bank(str(bank)), {**two, "refs": built["refs"]})
        return {"versions": built}

    monkeypatch.setattr(run_mod, "STAGES", [("ingest", ingest) if n == "ingest" else (n, f) for n, f in run_mod.STAGES])
    with pytest.raises(PublishConflict):
        run_all(load_config(None, [f"bank.uri={bank}"]), only="ingest,publish")
    meanwhile = live_versions(Bank(str(bank)))
    assert meanwhile["memories"] == two["memories"]  # the other publisher's build stays
