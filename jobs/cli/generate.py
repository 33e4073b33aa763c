"""`m3 generate`: its arguments. The prompts and where the output goes are the command's own;
the sampling flags stand for `--set infer.*` (the config checks them, as it checks the file)."""

from __future__ import annotations

import argparse

from jobs.cli.args import config_flag
from jobs.config import ConfigError


def add_parser(sub, common: argparse.ArgumentParser) -> None:
    g = sub.add_parser("generate", parents=[common], help="generate text with explicit memory (or none / rag)")
    g.add_argument("prompt", nargs="?", help="the prompt (or --prompts FILE.jsonl)")
    g.add_argument("--prompts", help='JSONL: one JSON string or {"prompt": ...} per line, generated in batches')
    config_flag(g, "--mode", "infer.mode", "memory, none or rag", metavar="MODE")
    config_flag(g, "--max-new-tokens", "infer.max_new_tokens", "tokens to generate", type=int, metavar="N")
    config_flag(g, "--temperature", "infer.temperature", "0 = greedy", type=float, metavar="T")
    config_flag(g, "--top-p", "infer.top_p", "nucleus sampling mass", type=float, metavar="P")
    g.add_argument("--show-memories", action="store_true", help="print the references each chunk read")
    g.add_argument(
        "--build",
        help="serve a published build (its number, `live`, -1 = the one before live) "
        "instead of the live one, with the model its memories were written by",
    )
    g.add_argument("--output", help="write one JSON object per prompt (text, chunks, references) here")


def cmd_generate(cfg, args) -> int:
    from jobs.inference.generate import generate_prompts, read_prompts

    if (args.prompt is None) == (args.prompts is None):
        raise ConfigError("m3 generate: give one prompt as an argument or --prompts FILE.jsonl")
    prompts = [args.prompt] if args.prompt is not None else read_prompts(args.prompts)
    return generate_prompts(cfg, prompts, build=args.build, output=args.output, show_memories=args.show_memories)
