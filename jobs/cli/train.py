"""`m3 train --stage warmup|continual|control`, and the entry point of each process a launcher
starts:

    m3 train -c configs/demo.yaml --stage warmup                       # Ray Train starts the workers
    python -m jobs.cli.train -c configs/demo.yaml --stage warmup       # the same, from a launcher's script
    deepspeed --num_gpus 2 -m jobs.cli.train -c F --stage warmup       # or torchrun: one process per rank

Under a launcher (RANK in the environment) each process runs the training loop itself
(jobs/training/trainer.py run_train, launcher "env"); otherwise Ray Train starts the workers.
"""

from __future__ import annotations

import argparse
import os
import sys

from jobs.cli.args import config_parser

STAGE_HELP = (
    "warmup (no memory), continual (with memory) or control (continual's steps without memory: "
    "the equal-compute control)"
)


def add_parser(sub, common: argparse.ArgumentParser) -> None:
    train = sub.add_parser("train", parents=[common], help="pretraining on DeepSpeed via Ray Train")
    train.add_argument("--stage", required=True, help=STAGE_HELP)


def cmd_train(cfg, args) -> int:
    from jobs.training.trainer import run_train

    run_train(cfg, args.stage)
    return 0


def main(argv: list[str] | None = None) -> int:
    from jobs.config import load_config
    from jobs.training.trainer import run_train

    p = argparse.ArgumentParser(
        prog="jobs.cli.train",
        parents=[config_parser()],
        description="one stage of training, in each process a launcher starts",
    )
    p.add_argument("--stage", required=True, help=STAGE_HELP)
    p.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # the deepspeed launcher's
    a = p.parse_args(argv)
    cfg = load_config(a.config, a.overrides)
    launched = "RANK" in os.environ  # set by deepspeed and torchrun; Ray Train workers set their own
    run_train(cfg, a.stage, launcher="env" if launched else "ray")
    return 0


if __name__ == "__main__":
    sys.exit(main())
