"""model/__init__.py loads its names on first use: the torch-free modules of the bottom layer
(errors, checked, config), imported by every command and every Ray worker, do not pull torch."""

import subprocess
import sys

import pytest

from tests.conftest import ROOT

LIGHT = (
    "model.errors",
    "model.checked",
    "model.config",
    "jobs.config",
    "jobs.cli.main",
    "jobs.stages.ingest",
    "pipelines.clean_step",
    "pipelines.dedup_step",
    "pipelines.chunk_step",
)


def test_the_light_modules_do_not_import_torch():
    code = f"import sys; import {', '.join(LIGHT)}; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False", out.stderr


def test_the_package_names_still_resolve():
    import model
    from model import Memory3, ModelConfig, load_model
    from model.checkpoint import load_model as direct
    from model.transformer import Memory3 as direct_cls

    assert load_model is direct and Memory3 is direct_cls and ModelConfig.__name__ == "ModelConfig"
    assert set(model.__all__) <= set(dir(model))
    with pytest.raises(AttributeError):
        model.no_such_name  # noqa: B018 - the attribute access is the test
