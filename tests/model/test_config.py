"""ModelConfig: presets, overrides, validation messages that name the field."""

import dataclasses

import pytest

from model import PRESETS, ModelConfig


def test_fields_are_plain_typed_for_yaml_introspection():
    for f in dataclasses.fields(ModelConfig):
        assert f.type in (int, float, bool, str), f.name
    required = {
        "vocab_size",
        "n_layers",
        "n_heads",
        "n_kv_heads",
        "head_dim",
        "d_model",
        "mlp_hidden",
        "n_mem_layers",
        "max_seq_len",
        "rope_theta",
        "norm_eps",
        "tie_embeddings",
        "mem_top_k",
        "mem_chunk_size",
        "mems_per_chunk",
        "ref_max_tokens",
        "score_combine",
        "pad_id",
        "bos_id",
        "eos_id",
        "ref_bos_id",
    }
    assert required <= {f.name for f in dataclasses.fields(ModelConfig)}


def test_presets():
    assert set(PRESETS) >= {"tiny", "small", "paper-2.4b"}
    paper = ModelConfig.from_preset("paper-2.4b")
    assert (
        paper.n_layers,
        paper.n_heads,
        paper.n_kv_heads,
        paper.head_dim,
        paper.d_model,
        paper.mlp_hidden,
        paper.vocab_size,
        paper.n_mem_layers,
    ) == (44, 40, 8, 80, 3200, 3200, 60416, 22)
    assert (paper.mem_top_k, paper.mem_chunk_size, paper.mems_per_chunk, paper.ref_max_tokens) == (8, 64, 5, 128)
    default = ModelConfig()
    assert (default.pad_id, default.bos_id, default.eos_id, default.ref_bos_id) == (0, 1, 2, 3)
    assert default.score_combine == "sum"


def test_overrides_and_int_for_float():
    cfg = ModelConfig.from_preset("small", n_layers=4, rope_theta=500000)
    assert cfg.n_layers == 4 and cfg.rope_theta == 500000.0 and isinstance(cfg.rope_theta, float)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.n_layers = 3


@pytest.mark.parametrize(
    "overrides,field",
    [
        (dict(n_kv_heads=3), "n_kv_heads"),
        (dict(head_dim=16), "d_model"),
        (dict(n_mem_layers=0), "n_mem_layers"),
        (dict(n_mem_layers=7), "n_mem_layers"),
        (dict(score_combine="avg"), "score_combine"),
        (dict(ref_bos_id=1), "ref_bos_id"),
        (dict(pad_id=9000), "pad_id"),
        (dict(mem_top_k=0), "mem_top_k"),
        (dict(head_dim=31, d_model=248), "head_dim"),
        (dict(n_layers="6"), "n_layers"),
        (dict(tie_embeddings=1), "tie_embeddings"),
        (dict(n_layers=True), "n_layers"),
        (dict(n_experts=4), "n_experts"),
    ],
)
def test_bad_values_name_the_field(overrides, field):
    with pytest.raises(ValueError, match=field):
        ModelConfig.from_preset("small", **overrides)


def test_unknown_preset():
    with pytest.raises(ValueError, match="huge"):
        ModelConfig.from_preset("huge")
