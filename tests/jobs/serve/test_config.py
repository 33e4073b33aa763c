"""The `serve:` section goes through the one validation path: wrong values fail at load time
naming the key; a server reachable off loopback must ask for a token."""

from __future__ import annotations

import pytest

from jobs.config import ConfigError, load_config
from model.checked import FieldError


def test_defaults_are_loopback_without_a_token():
    cfg = load_config("configs/demo.yaml")
    assert cfg.serve.host == "127.0.0.1" and cfg.serve.token is None
    cfg.serve.check_exposure(None)  # loopback: no token needed


@pytest.mark.parametrize(
    "override, words",
    [
        ("serve.replicas=0", "serve.replicas (--set): expected a value >= 1, got 0"),
        ("serve.port=70000", "serve.port (--set): expected a value <= 65535"),
        ('serve.token=""', "serve.token (--set): expected a non-empty string or null"),
        ("serve.max_batch_size=0", "serve.max_batch_size (--set): expected a value >= 1"),
        ("serve.build_poll_s=0", "serve.build_poll_s (--set): expected a value > 0"),
    ],
)
def test_bad_values_name_the_key(override, words):
    with pytest.raises(ConfigError) as e:
        load_config("configs/demo.yaml", [override])
    assert words in str(e.value)


def test_a_non_loopback_host_needs_a_token():
    cfg = load_config("configs/demo.yaml", ["serve.host=0.0.0.0"])
    with pytest.raises(FieldError, match=r"serve.token: a token when serve.host is not loopback \(0.0.0.0\)"):
        cfg.serve.check_exposure(None)
    cfg.serve.check_exposure("s3cret")
    load_config("configs/demo.yaml", ["serve.host=::1"]).serve.check_exposure(None)
