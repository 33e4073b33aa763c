"""The `infer:` section: every key typed and range-checked, errors naming the key."""

import pytest

from jobs.config import ConfigError, load_config
from jobs.config.infer import InferConfig


def test_defaults_follow_the_paper():
    from jobs.config.infer import InferConfig

    assert InferConfig().max_overlap == pytest.approx(2 / 3)
    ic = load_config("configs/demo.yaml").infer  # the demo writes 2/3 to four places
    assert ic.mode == "memory" and ic.max_overlap == pytest.approx(2 / 3, abs=1e-4) and ic.checkpoint is None
    assert load_config("configs/demo.yaml", ["infer.max_overlap=null"]).infer.max_overlap is None


@pytest.mark.parametrize(
    "override, message",
    [
        ("infer.mode=retrieval", "infer.mode (--set): expected one of 'memory', 'none', 'rag'"),
        ("infer.top_p=0", "infer.top_p (--set): expected a value > 0"),
        ("infer.temperature=-1", "infer.temperature (--set): expected a value >= 0"),
        ("infer.max_overlap=1.5", "infer.max_overlap (--set): expected a value <= 1"),
        ("infer.eval.tokens=1", "infer.eval.tokens (--set): expected a value >= 2"),
        ("infer.eval.sequnces=3", "unknown key 'infer.eval.sequnces' (--set); did you mean 'infer.eval.sequences'?"),
        ("infer.prefetch=maybe", "infer.prefetch (--set): expected true/false"),
        ("infer.cache_bytes=-1", "infer.cache_bytes (--set): expected a value >= 0, got -1"),
        ("infer.cache_bytes=lots", "infer.cache_bytes (--set): expected an integer or null, got 'lots'"),
    ],
)
def test_bad_values_name_the_key(override, message):
    with pytest.raises(ConfigError) as e:
        load_config("configs/demo.yaml", [override])
    assert message in str(e.value)


def test_hand_built_sections_are_checked_too():
    with pytest.raises(ValueError, match="mode"):
        InferConfig(mode="rag2")
    with pytest.raises(ValueError, match="top_p"):
        InferConfig(top_p=2.0)


def test_cache_bytes_is_optional_and_read_as_bytes():
    assert load_config("configs/demo.yaml").infer.cache_bytes is None  # bound by cache_size
    assert load_config("configs/demo.yaml", ["infer.cache_bytes=1000000"]).infer.cache_bytes == 1_000_000
    with pytest.raises(ValueError, match="cache_bytes"):
        InferConfig(cache_bytes=-5)
