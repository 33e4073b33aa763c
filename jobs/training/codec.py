"""The codec the continual stage's real-time memories pass through (train.through_codec):
training reads memories as the bank will serve them. Shared by the trainer and its evidence."""

from __future__ import annotations

from jobs.config import ConfigError
from jobs.config.train import TrainConfig


def memory_codec(cfg, tc: TrainConfig):
    """The codec the real-time memories pass through (train.through_codec), or None."""
    if not tc.through_codec:
        return None
    from model.codecs import make_codec

    if cfg.encode.codec == "vq":
        raise ConfigError(
            "train.through_codec: encode.codec 'vq' trains its quantizer on the finished "
            "model's memories, so training cannot pass memories through it; expected "
            "through_codec false, or a raw or int8 codec"
        )
    return make_codec(cfg.encode.codec)
