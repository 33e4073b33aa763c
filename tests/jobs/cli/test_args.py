"""All argument parsing lives in jobs/cli: a flag that duplicates a config key is another spelling
of --set (the config checks it, and its error names the key and the flag); the launcher's entry
point of training is jobs.cli.train."""

from __future__ import annotations

from pathlib import Path

import pytest

from jobs.cli.main import build_parser, main
from jobs.config import load_config

ROOT = Path(__file__).resolve().parents[3]
DEMO = "configs/demo.yaml"


def resolved(argv: list[str]):
    args = build_parser().parse_args(argv)
    return args, load_config(args.config, args.overrides)


def test_generate_flags_are_config_keys():
    args, cfg = resolved(
        [
            "generate",
            "-c",
            DEMO,
            "A compiler is",
            "--mode",
            "rag",
            "--max-new-tokens",
            "7",
            "--temperature",
            "1e-3",
            "--top-p",
            "0.5",
        ]
    )
    assert (cfg.infer.mode, cfg.infer.max_new_tokens, cfg.infer.temperature, cfg.infer.top_p) == ("rag", 7, 1e-3, 0.5)
    assert args.prompt == "A compiler is" and ("infer.mode", "rag", "--mode") in args.overrides
    _, plain = resolved(["generate", "-c", DEMO, "x"])
    assert plain.infer == load_config(DEMO).infer  # no flag: the config's own


def test_a_flag_and_set_apply_in_command_line_order():
    _, cfg = resolved(["generate", "-c", DEMO, "x", "--set", "infer.temperature=0.5", "--temperature", "0.7"])
    assert cfg.infer.temperature == 0.7
    _, cfg = resolved(["generate", "-c", DEMO, "x", "--temperature", "0.7", "--set", "infer.temperature=0.5"])
    assert cfg.infer.temperature == 0.5


@pytest.mark.parametrize(
    "flags,message",
    [
        (["--max-new-tokens", "0"], "infer.max_new_tokens (--max-new-tokens): expected a value >= 1, got 0"),
        (["--temperature", "-1"], "infer.temperature (--temperature): expected a value >= 0, got -1.0"),
        (["--top-p", "1.5"], "infer.top_p (--top-p): expected a value <= 1, got 1.5"),
        (["--mode", "retrieval"], "infer.mode (--mode): expected one of 'memory', 'none', 'rag', got 'retrieval'"),
    ],
)
def test_a_bad_flag_is_a_config_error_naming_key_and_flag(capsys, flags, message):
    assert main(["generate", "-c", DEMO, "A compiler is", *flags]) == 2
    assert capsys.readouterr().err == f"m3 generate: error: {message}\n"


def test_generate_needs_one_prompt_source(capsys):
    assert main(["generate", "-c", DEMO]) == 2
    assert "give one prompt as an argument or --prompts FILE.jsonl" in capsys.readouterr().err


def test_schedule_address_is_schedule_address():
    args, cfg = resolved(["schedule", "-c", DEMO, "--address", "http://head:8265", "--max-runs", "1"])
    assert cfg.schedule.address == "http://head:8265" and args.max_runs == 1
    _, cfg = resolved(["schedule", "-c", DEMO])
    assert cfg.schedule.address is None
    args = build_parser().parse_args(["submit", "ingest", "--address", "http://head:8265"])
    assert args.address == "http://head:8265"  # the Jobs API of one submission: no config key


def test_the_training_launcher_entry_point(monkeypatch):
    import jobs.training.trainer as trainer
    from jobs.cli.train import main as launch

    calls = []
    monkeypatch.setattr(trainer, "run_train", lambda cfg, stage, launcher="ray": calls.append((cfg, stage, launcher)))
    monkeypatch.delenv("RANK", raising=False)
    assert launch(["-c", DEMO, "--stage", "warmup", "--set", "train.workers=1"]) == 0
    monkeypatch.setenv("RANK", "1")  # a deepspeed / torchrun process: it runs the loop itself
    assert launch(["--local_rank=1", "-c", DEMO, "--stage", "continual"]) == 0
    (cfg, stage, launcher), (_, stage2, launcher2) = calls
    assert (cfg.train.workers, stage, launcher, stage2, launcher2) == (1, "warmup", "ray", "continual", "env")


def test_argument_parsing_lives_in_jobs_cli():
    outside = [
        str(p.relative_to(ROOT))
        for top in ("jobs", "model", "pipelines", "storage")
        for p in (ROOT / top).rglob("*.py")
        if "argparse" in p.read_text(encoding="utf-8") and not p.is_relative_to(ROOT / "jobs" / "cli")
    ]
    assert outside == []
