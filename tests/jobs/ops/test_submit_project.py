"""What `m3 submit` ships and runs, without a cluster: the project's checkout as the job's working
directory (jobs/project.py), Ray's upload of it small (no .venv, .git or banks), paths in the
config relative only to what the upload holds, and the job's Python found on the head. The
jobs themselves run against a head started as the README says, without the .venv on PATH, in
tests/jobs/ops/test_submit.py."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import zipfile
from pathlib import Path

import yaml

from jobs.config import load_config
from jobs.ops.submit import entrypoint, portable_config, runtime_env
from jobs.project import PACKAGES, ROOT
from tests.conftest import ROOT as TESTS_ROOT


def demo(*overrides: str):
    return load_config(str(TESTS_ROOT / "configs" / "demo.yaml"), list(overrides))


def test_the_job_ships_the_project_checkout():
    wd = Path(runtime_env(demo())["working_dir"])
    assert wd == ROOT == TESTS_ROOT  # not jobs/, where Path(__file__).parents[1] of jobs/ops/submit.py points
    assert (wd / "pyproject.toml").is_file()
    for package in PACKAGES:
        assert (wd / package / "__init__.py").is_file(), package
    assert (wd / "jobs" / "cli" / "entry.py").is_file()  # what the entrypoint runs


def test_the_upload_is_small_and_leaves_out_venv_git_and_banks(tmp_path):
    """Zipped as Ray zips a working_dir (its own function, .gitignore honoured as by default)."""
    from ray._private.runtime_env.packaging import _zip_files

    env = runtime_env(demo(f"bank.uri={ROOT / 'my-bank'}", f"train.run_dir={ROOT / 'my-runs'}"))
    assert {"/.git", "/.venv", "/bank", "/my-bank", "/my-runs"} <= set(env["excludes"])
    out = tmp_path / "wd.zip"
    _zip_files(env["working_dir"], env["excludes"], str(out), include_gitignore=True)
    names = zipfile.ZipFile(out).namelist()
    assert {
        "pyproject.toml",
        "jobs/cli/entry.py",
        "model/__init__.py",
        "pipelines/__init__.py",
        "storage/sql.py",
        "data/foldoc/foldoc.jsonl.gz",
    } <= set(names)
    top = {n.split("/")[0] for n in names}
    assert not top & {".venv", ".git", "bank", "runs", "my-bank", "my-runs"}, top
    assert not [n for n in names if "__pycache__" in n or ".egg-info" in n]
    assert out.stat().st_size < 30 * 2**20, out.stat().st_size  # ~6 MB: the code, tests and data/


def test_paths_are_relative_only_to_what_the_upload_holds():
    cfg = demo(
        f"encode.checkpoint={ROOT / 'bank' / 'demo' / 'training' / 'continual' / 'model'}",
        f"tokenizer.path={ROOT / 'data' / 'tok.json'}",
    )
    d = portable_config(cfg, job=True)
    assert d["corpus"]["paths"] == ["data/foldoc/foldoc.jsonl.gz"]  # shipped: found in the job's working dir
    assert d["tokenizer"]["path"] == "data/tok.json"
    assert d["encode"]["checkpoint"] == str(ROOT / "bank" / "demo" / "training" / "continual" / "model")  # not
    assert d["bank"]["uri"] == str(ROOT / "bank" / "demo") and d["ray"]["address"] == "auto"


def test_roles_follow_the_paths_they_are_keyed_by(tmp_path):
    """corpus.roles is keyed by corpus.paths as written: a path made portable takes its role along,
    and the config the job loads is valid."""
    outside = tmp_path / "kb.jsonl"
    outside.write_text('{"text": "x"}\n')
    shipped = str(ROOT / "data" / "foldoc" / "foldoc.jsonl.gz")
    d = portable_config(
        demo(f"corpus.paths=[{shipped}, {outside}]", f"corpus.roles={{{shipped}: training, {outside}: bank}}"), job=True
    )
    assert d["corpus"]["paths"] == ["data/foldoc/foldoc.jsonl.gz", str(outside)]
    assert d["corpus"]["roles"] == {"data/foldoc/foldoc.jsonl.gz": "training", str(outside): "bank"}
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(d))
    assert load_config(str(path)).corpus.roles == d["corpus"]["roles"]


def fake_python(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f'#!/bin/sh\necho "{path.name}: $*"\n')
    path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return path


def test_the_entrypoint_runs_this_python_where_the_head_has_it_else_the_one_on_path(tmp_path, monkeypatch):
    here = fake_python(tmp_path / "venv" / "bin" / "python-here")
    on_path = fake_python(tmp_path / "path" / "python")
    env = {**os.environ, "PATH": f"{on_path.parent}:/usr/bin:/bin"}

    def run() -> str:  # as the head runs it: the entrypoint through a shell
        return subprocess.run(
            entrypoint("train", ["--stage", "warm up"]), shell=True, env=env, capture_output=True, text=True, check=True
        ).stdout.strip()

    monkeypatch.setattr(sys, "executable", str(here))
    assert run() == "python-here: -m jobs.cli.entry train --stage warm up"
    monkeypatch.setattr(sys, "executable", str(tmp_path / "not on this machine" / "python"))
    assert run() == "python: -m jobs.cli.entry train --stage warm up"
