"""Where a training stage lives and what it reads: <bank>/training/<stage>/ (or train.run_dir),
the warmup model the continual stage starts from, and the codec its real-time memories pass
through. Shared by the trainer (jobs/train.py) and its evidence (jobs/train_eval.py)."""

from __future__ import annotations

from pathlib import Path

from jobs.config import ConfigError
from jobs.train_config import TrainConfig
from storage.layout import BankLayout


def stage_dir(cfg, stage: str) -> Path:
    run_dir = getattr(getattr(cfg, "train", None), "run_dir", None)
    root = Path(run_dir) if run_dir else BankLayout(cfg.bank.uri).training()
    return root.resolve() / stage


def warmup_model_dir(cfg, tc: TrainConfig) -> Path:
    return Path(tc.warmup_checkpoint) if tc.warmup_checkpoint else stage_dir(cfg, "warmup") / "model"


def memory_codec(cfg, tc: TrainConfig):
    """The codec the real-time memories pass through (train.through_codec), or None."""
    if not tc.through_codec:
        return None
    from model.codecs import make_codec

    if cfg.encode.codec == "vq":
        raise ConfigError("train.through_codec: encode.codec 'vq' trains its quantizer on the finished "
                          "model's memories, so training cannot pass memories through it; expected "
                          "through_codec false, or a raw or int8 codec")
    return make_codec(cfg.encode.codec)
