"""Where models live (jobs/models.py, Bank.training) for a bank on an object store: training checkpoints and
initial models stay on a local or shared directory, and asking for them without one names the
setting to give."""

from __future__ import annotations

import pytest

from jobs.config import load_config
from jobs.models import model_for_encoding, newest_trained
from storage.bank import Bank
from storage.layout import LayoutError


def test_training_of_an_s3_bank_lives_under_train_run_dir(tmp_path):
    cfg = load_config("configs/demo.yaml", ["bank.uri=s3://m3-test/bank"])
    with pytest.raises(
        LayoutError,
        match=r"train.run_dir: the bank at s3://m3-test/bank is on an object store.*"
        r"set train.run_dir to a local or shared directory",
    ):
        Bank.of(cfg).training("warmup")
    assert newest_trained(Bank.of(cfg)) is None  # nothing can have been trained there
    local = load_config("configs/demo.yaml", ["bank.uri=s3://m3-test/bank", f"train.run_dir={tmp_path}"])
    assert Bank.of(local).training("continual") == tmp_path / "continual"
    remote = load_config("configs/demo.yaml", ["bank.uri=s3://m3-test/bank", "train.run_dir=s3://m3-test/runs"])
    with pytest.raises(LayoutError, match=r"train.run_dir=s3://m3-test/runs: .*give a local or shared directory"):
        Bank.of(remote).training("warmup")


def test_encoding_an_s3_bank_without_a_checkpoint_asks_for_one(s3):
    cfg = load_config("configs/demo.yaml", [f"bank.uri={s3[0]}/models-bank"])
    with pytest.raises(
        LayoutError,
        match=r"encode.checkpoint: the bank at s3://m3-test/models-bank is on an "
        r"object store, which keeps no models",
    ):
        model_for_encoding(cfg, Bank.of(cfg))
