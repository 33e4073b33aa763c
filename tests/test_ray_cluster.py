"""ray_cluster.yaml and ray_cluster.local.yaml are real cluster-launcher configs: Ray's own
preparation (defaults merged as `ray up` does) and schema validation accept them, and they
install the project the way the README does."""

from __future__ import annotations

import copy

import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

from tests.conftest import ROOT

CONFIGS = ["ray_cluster.yaml", "ray_cluster.local.yaml"]


def load(name: str) -> dict:
    return yaml.safe_load((ROOT / name).read_text())


@pytest.mark.parametrize("name", CONFIGS)
def test_ray_accepts_the_cluster_config(name):
    raw = load(name)
    validate_config(prepare_config(raw))  # what `ray up` runs before touching any machine


@pytest.mark.parametrize("name", CONFIGS)
def test_nodes_install_the_project_as_the_readme_does(name):
    cfg = load(name)
    assert any("bash scripts/env.sh" in c for c in cfg["setup_commands"])
    assert cfg["file_mounts"]["~/m3"] == "."
    for cmds in (cfg["head_start_ray_commands"], cfg["worker_start_ray_commands"]):
        assert any("m3/.venv/bin" in c and "ray start" in c for c in cmds)  # Ray from the project's venv


@pytest.mark.parametrize("name", CONFIGS)
def test_every_node_joins_with_one_token(name):
    """As tests/cluster starts its nodes and docs/cluster.md's "On a cluster" says: one token, on every
    node, every node in token mode (a node that joins without it is refused)."""
    cfg = load(name)
    assert cfg["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"
    for cmds in (cfg["head_start_ray_commands"], cfg["worker_start_ray_commands"]):
        start = [c for c in cmds if "ray start" in c]
        assert start and all("RAY_AUTH_MODE=token" in c for c in start)
    assert not any("--generate" in c for c in cfg["head_start_ray_commands"])  # not a second token


def test_aws_config_has_cpu_and_gpu_workers():
    types = load("ray_cluster.yaml")["available_node_types"]
    assert types["cpu_worker"]["resources"].get("GPU", 0) == 0 and types["cpu_worker"]["resources"]["CPU"] > 0
    assert types["gpu_worker"]["resources"]["GPU"] >= 1
    assert "GPU" not in types["head"]["resources"]


def test_a_broken_config_is_rejected():
    """The check can fail: a misspelled key is refused by Ray's schema."""
    bad = copy.deepcopy(load("ray_cluster.yaml"))
    bad["available_node_types"]["gpu_worker"]["max_worker"] = 4
    with pytest.raises(Exception, match="max_worker"):
        validate_config(prepare_config(bad))
