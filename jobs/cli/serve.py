"""`m3 serve`: its arguments. Where it listens and how it batches are the config's `serve:` keys;
the flags stand for `--set serve.*` (the config checks them)."""

from __future__ import annotations

import argparse

from jobs.cli.args import config_flag


def add_parser(sub, common: argparse.ArgumentParser) -> None:
    s = sub.add_parser(
        "serve", parents=[common], help="serve the model and its live build: an OpenAI-compatible API on Ray Serve"
    )
    config_flag(s, "--host", "serve.host", "address to listen on (loopback unless a token is set)", metavar="HOST")
    config_flag(s, "--port", "serve.port", "port (0 = a free one)", type=int, metavar="PORT")
    config_flag(s, "--replicas", "serve.replicas", "replicas of the deployment", type=int, metavar="N")


def cmd_serve(cfg, args) -> int:
    from jobs.serve.server import run

    return run(cfg)
