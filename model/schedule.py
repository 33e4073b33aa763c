"""Warmup-stable-decay (WSD) learning-rate schedule, as used for Memory³ pretraining.

The paper trains with MiniCPM's WSD schedule: a linear ramp, a long constant stage, and a rapid
decay over the last 10 % of the steps (paper §5.1; the peak and final values are only plotted,
so they are config, not constants here). The appeal for a two-stage run is that the stable stage
can be cut or extended at any point: a checkpoint taken before the decay is a good starting point
for the continual-train stage or for a restart at a lower rate after a divergence, which is how
the paper's runs actually went.

Shape over the step s (optimizer updates done so far), with D = decay steps, S = total - D:

    [0, warmup]   peak * s / warmup                    (0 at s = 0, as in HF's linear warmup)
    [warmup, S]   peak
    [S, total]    from peak down to floor = peak * min_lr_ratio, p = (s - S) / D:
                    exp     peak * min_lr_ratio ** p   (geometric: MiniCPM's exponential decay,
                                                        pinned to reach the floor at the end)
                    linear  peak + (floor - peak) * p
                    cosine  floor + (peak - floor) * (1 + cos(pi p)) / 2
    beyond total  the rate at total (training past the schedule keeps the final rate)

The function is continuous in s (also at fractional steps), non-decreasing through warmup and
non-increasing through the decay. Pure Python; `lr_lambda` adapts it to
`torch.optim.lr_scheduler.LambdaLR`.
"""

import math
from dataclasses import dataclass, field
from typing import Callable

from model.checked import check_fields, require

__all__ = ["DECAYS", "WSDConfig", "lr_at", "lr_lambda"]

DECAYS = ("exp", "linear", "cosine")


@dataclass(frozen=True)
class WSDConfig:
    peak_lr: float = field(metadata={"gt": 0})
    warmup_steps: int = field(metadata={"ge": 0})
    total_steps: int = field(metadata={"ge": 1})
    decay_fraction: float = field(default=0.1, metadata={"ge": 0, "le": 1})  # the paper's "last 10 % of steps"
    min_lr_ratio: float = field(default=0.1, metadata={"ge": 0, "le": 1})  # floor = peak_lr * min_lr_ratio
    decay: str = field(default="exp", metadata={"choices": DECAYS})

    def __post_init__(self) -> None:
        check_fields(self)
        # A geometric decay never reaches 0: ask for a floor instead of silently changing shape.
        require(
            self.decay != "exp" or self.min_lr_ratio > 0,
            "min_lr_ratio",
            "a value > 0 for decay='exp' (use 'linear' or 'cosine' to decay to 0)",
            self.min_lr_ratio,
        )
        require(
            self.warmup_steps + self.decay_steps <= self.total_steps,
            "warmup_steps",
            f"at most total_steps={self.total_steps} minus the {self.decay_steps} decay steps "
            f"(decay_fraction={self.decay_fraction})",
            self.warmup_steps,
        )

    @property
    def decay_steps(self) -> int:
        """Steps in the decay phase: decay_fraction * total_steps, rounded half up (so 0.1 *
        1000 is 100, not 101 from the float product 100.00000000000001 rounded up)."""
        return min(self.total_steps, math.floor(self.decay_fraction * self.total_steps + 0.5))

    @property
    def decay_start(self) -> int:
        return self.total_steps - self.decay_steps

    @property
    def min_lr(self) -> float:
        return self.peak_lr * self.min_lr_ratio

    @property
    def final_lr(self) -> float:
        """The rate at total_steps and beyond: the floor, or the peak if there is no decay."""
        return self.min_lr if self.decay_steps else self.peak_lr


def lr_at(step: float, cfg: WSDConfig) -> float:
    """Learning rate after `step` optimizer updates (step >= 0; int or fractional)."""
    if isinstance(step, bool) or not isinstance(step, (int, float)) or not step >= 0:
        raise ValueError(f"step: must be a number >= 0, got {step!r}")
    if step < cfg.warmup_steps:
        return cfg.peak_lr * step / cfg.warmup_steps
    if step <= cfg.decay_start:
        return cfg.peak_lr
    if step >= cfg.total_steps:
        return cfg.final_lr
    p = (step - cfg.decay_start) / cfg.decay_steps  # decay_steps > 0 here: decay_start < total
    if cfg.decay == "exp":
        return cfg.peak_lr * cfg.min_lr_ratio**p
    if cfg.decay == "linear":
        return cfg.peak_lr + (cfg.min_lr - cfg.peak_lr) * p
    return cfg.min_lr + (cfg.peak_lr - cfg.min_lr) * (1 + math.cos(math.pi * p)) / 2


def lr_lambda(cfg: WSDConfig) -> Callable[[int], float]:
    """Multiplier of peak_lr per step, for LambdaLR with the optimizer's lr set to peak_lr."""
    return lambda step: lr_at(step, cfg) / cfg.peak_lr
