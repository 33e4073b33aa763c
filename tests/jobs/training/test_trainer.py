"""Two-stage training end to end: real DeepSpeed (gloo, CPU) under real Ray Train, tiny model.

The bank is a small real one: FOLDOC ingested, embedded and paired by the jobs themselves.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from jobs.config import ConfigError, load_config
from jobs.config.loader import _Where, build
from jobs.config.train import TrainConfig
from jobs.stages.embed import run_embed
from jobs.stages.ingest import run_ingest
from jobs.stages.pair import run_pair
from jobs.training.evidence import evaluate_checkpoint
from jobs.training.trainer import TrainError, read_log, run_train
from model import load_model, model_hash
from storage.bank import Bank, BankError
from tests.conftest import ROOT, write_foldoc_corpus

pytestmark = pytest.mark.slow

TINY = [
    "model.preset=tiny",
    "model.vocab_size=600",
    "model.ref_max_tokens=128",
    "model.max_seq_len=512",
    "model.mem_chunk_size=64",
]
FAST = dict(
    workers=2,
    cpus_per_worker=0.5,
    micro_batch=2,
    checkpoint_every=2,
    lr_warmup_steps=1,
    log_every=2,
    eval_sequences=4,
    max_tokens=192,
)


def config(corpus: Path, bank: Path, *extra: str):
    """configs/demo.yaml made tiny: the small real corpus, the tiny model, one thread per actor."""
    return load_config(
        ROOT / "configs" / "demo.yaml",
        [
            f"corpus.paths=[{corpus}]",
            f"bank.uri={bank}",
            "corpus.records_per_shard=100",
            "tokenizer.vocab_size=600",
            "chunking.seq_len=256",
            "ray.num_cpus=2",
            "retrieval.refs_per_shard=200",
            "retrieval.threads_per_actor=1",
            "pair.seqs_per_shard=32",
            *TINY,
            *extra,
        ],
    )


@pytest.fixture(scope="module")
def base(tmp_path_factory, ray_local):
    """An ingested, embedded and paired tiny bank; tests copy it."""
    root = tmp_path_factory.mktemp("train")
    corpus = write_foldoc_corpus(root / "c.jsonl.gz", 120, min_words=60)
    bank = root / "bank"
    cfg = config(corpus, bank)
    run_ingest(cfg)
    run_embed(cfg)
    run_pair(cfg)
    return corpus, bank


def copy_bank(base, tmp_path, name="bank"):
    dst = tmp_path / name
    shutil.copytree(base[1], dst)
    return config(base[0], dst)


def test_two_workers_warmup_then_continual(base, tmp_path):
    cfg = copy_bank(base, tmp_path)
    tc = TrainConfig(**FAST, warmup_stage_steps=4, continual_stage_steps=4, zero_stage=1)
    warm = run_train(cfg, "warmup", tc)
    rows = read_log(Bank.of(cfg), "warmup")
    assert [r["step"] for r in rows] == [1, 2, 3, 4] and warm["steps"] == 4
    assert all(r["memory_hits"] == 0 and r["tokens_per_s"] > 0 for r in rows)
    model_dir = Bank.of(cfg).trained_model("warmup")
    assert model_hash(load_model(model_dir)) == json.loads((model_dir / "export.json").read_text())["model_hash"]

    cont = run_train(cfg, "continual", tc)
    rows = read_log(Bank.of(cfg), "continual")
    assert len(rows) == 4 and all(r["memory_hits"] > 0 for r in rows)
    assert all(r["chunks"] == 2 * 2 * 3 for r in rows)  # 2 workers x 2 sequences x 192/64 chunks
    export = json.loads((Bank.of(cfg).trained_model("continual") / "export.json").read_text())
    # what the model was trained to read, which the bank's readers hold the served memories to
    assert export["memory"] == {
        "reads_memory": True,
        "schedule": "serving",
        "top_k": cfg.model.mem_top_k,
        "codec": "int8",
        "refs_per_chunk": cfg.model.mems_per_chunk,
    }
    assert json.loads((model_dir / "export.json").read_text())["memory"] == {"reads_memory": False}
    ev = cont["evidence"]
    assert set(ev) >= {"warmup_loss", "continual_loss_no_memory", "continual_loss_memory"}
    assert ev["paired"]["of"] == ev["sequences"] and ev["paired_other"]["of"] == ev["sequences"]
    # the continual stage started from the warmup weights, not from a fresh init
    warm_ev = evaluate_checkpoint(cfg, Bank.of(cfg), model_dir, tc, with_memory=False)
    assert warm_ev["sink"] is False and warm_ev["modes"]["none"]["loss"] == pytest.approx(ev["warmup_loss"])


def test_memory_from_scratch_and_the_control_recipe(base, tmp_path):
    """The paper's Fig. 11 recipes: a warmup stage that reads memories (memory from scratch, the
    paper's schedule) and a continual stage trained on the same tokens without them (the control),
    each in a run directory of its own."""
    import dataclasses

    cfg = copy_bank(base, tmp_path)
    tc = TrainConfig(
        **FAST,
        warmup_stage_steps=2,
        continual_stage_steps=2,
        memory_schedule="paper",
        sparsify_refs=False,
        through_codec=False,
        warmup_with_memory=True,
        continual_with_memory=False,
        run_dir=str(tmp_path / "runs" / "mm"),
    )
    run_train(cfg, "warmup", tc)
    cfg = dataclasses.replace(cfg, train=tc)
    assert [r["memory_hits"] > 0 for r in read_log(Bank.of(cfg), "warmup")] == [True, True]
    warm = Bank.of(cfg).trained_model("warmup")
    assert warm.parent.parent == tmp_path / "runs" / "mm"
    assert json.loads((warm / "export.json").read_text())["memory"] == {
        "reads_memory": True,
        "schedule": "paper",
        "top_k": 128,
        "codec": None,
        "refs_per_chunk": 1,
    }
    out = run_train(cfg, "continual", tc)
    assert "evidence" not in out  # a continual stage without memory has no memory to give evidence for
    assert all(r["memory_hits"] == 0 for r in read_log(Bank.of(cfg), "continual"))
    assert json.loads((Bank.of(cfg).trained_model("continual") / "export.json").read_text())["memory"] == {
        "reads_memory": False
    }


@pytest.mark.faults
def test_resume_after_kill_reproduces_the_loss_trajectory(base, tmp_path, monkeypatch):
    tc = TrainConfig(**FAST, warmup_stage_steps=6, zero_stage=2)
    straight = copy_bank(base, tmp_path, "straight")
    run_train(straight, "warmup", tc)
    want = [r["loss"] for r in read_log(Bank.of(straight), "warmup")]

    crashed = copy_bank(base, tmp_path, "crashed")
    monkeypatch.setenv("M3_CRASH_AT", "train:3")  # dies after step 3; last checkpoint is step 2
    with pytest.raises(TrainError):
        run_train(crashed, "warmup", tc)
    assert [r["step"] for r in read_log(Bank.of(crashed), "warmup")] == [1, 2, 3]
    monkeypatch.delenv("M3_CRASH_AT")
    run_train(crashed, "warmup", tc)
    got = [r["loss"] for r in read_log(Bank.of(crashed), "warmup")]
    assert len(got) == len(want) == 6
    assert got == pytest.approx(want, abs=1e-6, rel=0)
    a, b = (load_model(Bank.of(c).trained_model("warmup")) for c in (straight, crashed))
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        assert (x - y).abs().max().item() < 1e-6, name


def test_config_errors(base, tmp_path):
    cfg = config(base[0], base[1])
    with pytest.raises(ConfigError, match="--stage"):
        run_train(cfg, "finetune", TrainConfig())
    with pytest.raises(BankError, match="warmup"):
        run_train(cfg, "continual", TrainConfig(warmup_checkpoint=str(tmp_path / "no-warmup")))
    with pytest.raises(ConfigError, match="zero_stage"):
        build(TrainConfig, {"zero_stage": 3}, "train", _Where("test.yaml"))
    with pytest.raises(ValueError, match="zero_stage"):
        TrainConfig(zero_stage=0)
    with pytest.raises(ConfigError, match="max_tokens"):
        run_train(cfg, "warmup", TrainConfig(max_tokens=4096))


@pytest.mark.long  # ~65 s: CI runs it after the suite
def test_the_equal_compute_control(base, tmp_path):
    """`m3 run --only control`: the continual stage's steps, rate and sequences from the same warmup
    model, without memory, exported where Bank.trained_model says and never picked to encode or serve;
    `train.control: false` skips it."""
    import dataclasses

    from jobs.models import CONTROL, model_for_serving, newest_trained
    from jobs.ops.run import run_all
    from jobs.training.log import curve_starts
    from jobs.training.trainer import STAGES
    from model.checkpoint import saved_hash
    from storage.bank import Bank

    tc = TrainConfig(**FAST, warmup_stage_steps=2, continual_stage_steps=3, lr_continual=1e-3, evidence=False)
    cfg = dataclasses.replace(copy_bank(base, tmp_path), train=tc)
    run_train(cfg, "warmup")
    run_train(cfg, "continual")
    warm, cont = (Bank.of(cfg).trained_model(s) for s in ("warmup", "continual"))

    off = run_all(dataclasses.replace(cfg, train=dataclasses.replace(tc, control=False)), only="control")
    assert off["stages"]["control"]["status"] == "skipped" and not Bank.of(cfg).training("control").exists()
    assert (
        "| control |" in Path(off["report"]).read_text()
        and "skipped (train.control: false)" in Path(off["report"]).read_text()
    )

    out = run_all(cfg, only="control")["stages"]["control"]
    model = Bank.of(cfg).trained_model(CONTROL)
    assert out["model_dir"] == str(model) and out["steps"] == 3
    rows, cont_rows = read_log(Bank.of(cfg), "control"), read_log(Bank.of(cfg), "continual")
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert all(r["memory_hits"] == 0 and r["chunks"] == 0 for r in rows)  # it reads no memory
    assert all(r["memory_hits"] > 0 for r in cont_rows)
    assert [r["lr"] for r in rows] == [r["lr"] for r in cont_rows]  # the continual stage's rate and schedule
    export = json.loads((model / "export.json").read_text())
    assert export["stage"] == "control" and export["memory"] == {"reads_memory": False} and export["step"] == 3
    started = json.loads((cont / "export.json").read_text())["init_model_hash"]
    assert export["init_model_hash"] == started == saved_hash(warm)  # the same warmup model
    assert export["model_hash"] == model_hash(load_model(model))

    # the same sequences in the same order: a continual stage trained without memory from the same
    # warmup model is the control, loss for loss
    plain = dataclasses.replace(
        tc, continual_with_memory=False, run_dir=str(tmp_path / "runs" / "plain"), warmup_checkpoint=str(warm)
    )
    run_train(cfg, "continual", plain)
    want = [r["loss"] for r in read_log(Bank.of(dataclasses.replace(cfg, train=plain)), "continual")]
    assert [r["loss"] for r in rows] == pytest.approx(want, abs=1e-6, rel=0)

    # its curve is drawn beside the continual stage's, after warmup
    assert curve_starts({s: read_log(Bank.of(cfg), s) for s in STAGES}) == {"warmup": 0, "continual": 2, "control": 2}
    assert (Bank.of(cfg).training("control").parent / "loss.png").exists()

    # never the model that encodes or serves the bank
    assert newest_trained(Bank.of(cfg)) == cont and model_for_serving(cfg, Bank.of(cfg)) == cont
    shutil.rmtree(cont)
    assert newest_trained(Bank.of(cfg)) == warm
    assert newest_trained(Bank.of(cfg), ("continual",)) is None
    with pytest.raises(ValueError, match="control"):
        newest_trained(Bank.of(cfg), ("control", "warmup"))
