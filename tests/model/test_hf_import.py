"""Importing Hugging Face checkpoints: without memories, our forward is transformers' forward."""

from __future__ import annotations

import json

import pytest
import torch

from model.checkpoint import load_model, model_hash, saved_hash
from model.hf_config import HFModelError
from model.hf_export import export_hf
from model.hf_import import import_hf
from tests.model.hf_fixtures import CASES, make_hf_model

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module", params=sorted(CASES))
def imported(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(request.param)
    hf = make_hf_model(root / "hf", request.param)
    report = import_hf(root / "hf", root / "m3", memory=dict(mem_top_k=4, mem_chunk_size=16, ref_max_tokens=32))
    return request.param, root, hf, report, load_model(root / "m3")


def _tokens(vocab: int, shape=(2, 40), seed=1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, shape, generator=g)


def test_logits_equal_transformers(imported):
    case, _, hf, report, model = imported
    n = report["vocab_size"]["tokenizer"]  # the rows past it are the spare or added ones
    tokens = _tokens(n)
    with torch.no_grad():
        want = hf(tokens).logits[..., :n]
        got = model(tokens)[..., :n]
    assert (got - want).abs().max().item() < 1e-4, case


def test_greedy_generation_equal_token_for_token(imported):
    from model.decode import generate

    _, _, hf, report, model = imported
    prompt = _tokens(report["vocab_size"]["tokenizer"], (1, 12), seed=2)
    with torch.no_grad():
        want = hf.generate(prompt, max_new_tokens=20, do_sample=False, min_new_tokens=20, eos_token_id=None)
        got = generate(model, prompt, 20)
    assert got.tolist() == want.tolist()


def test_hash_config_and_report(imported):
    case, root, _, report, model = imported
    assert saved_hash(root / "m3") == model_hash(model) == report["model_hash"]
    cfg = model.config
    ids = report["special_ids"]
    assert (cfg.pad_id, cfg.bos_id, cfg.eos_id, cfg.ref_bos_id) == tuple(
        ids[k] for k in ("pad_id", "bos_id", "eos_id", "ref_bos_id")
    )
    tok = json.loads((root / "m3" / "tokenizer.json").read_text())
    added = {a["content"]: a["id"] for a in tok["added_tokens"]}
    assert added["<ref>"] == cfg.ref_bos_id
    rows = {a["token"]: a for a in report["added_rows"]}
    assert "<ref>" in rows and rows["<ref>"]["init"]
    emb = model.tok_emb.weight
    hf_bos = json.loads((root / "hf" / "config.json").read_text())["bos_token_id"]
    assert torch.equal(emb[cfg.ref_bos_id], emb[hf_bos])  # the sink starts as the model's BOS
    if case == "qwen2":  # bos = eos and a padded matrix: bos, pad and <ref> on the spare rows 90..92
        assert sorted(a["id"] for a in report["added_rows"]) == [90, 91, 92] and cfg.vocab_size == 100
        assert not any(a["new_row"] for a in report["added_rows"])
    else:  # no spare rows: <ref> (and the missing pad) on new rows at the end
        assert cfg.vocab_size == report["vocab_size"]["source"] + len(report["added_rows"])
    assert cfg.n_mem_layers == 1 and cfg.mem_top_k == 4


def test_memory_layers_read_memories(imported):
    """The imported model writes and reads memories with no new weights."""
    _, _, _, report, model = imported
    cfg = model.config
    refs = _tokens(report["vocab_size"]["tokenizer"], (2, 20), seed=3)
    enc = model.encode_references(refs)
    mems = enc.kv if hasattr(enc, "kv") else enc[0]
    tokens = _tokens(report["vocab_size"]["tokenizer"], (1, 16), seed=4)
    memories = mems[None, None]  # one chunk reading both references
    with torch.no_grad():
        out = model(tokens, memories)
    assert out.shape == (1, 16, cfg.vocab_size) and torch.isfinite(out).all()


def test_round_trip_import_export_transformers(imported, tmp_path):
    _, root, hf, report, model = imported
    export_hf(root / "m3", tmp_path / "export")
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "export", dtype=torch.float32).eval()
    tokens = _tokens(report["vocab_size"]["tokenizer"])
    with torch.no_grad():
        assert (back(tokens).logits - model(tokens)).abs().max().item() < 1e-4
    again = import_hf(tmp_path / "export", tmp_path / "m3-again")
    assert again["model_hash"] == report["model_hash"] and again["added_rows"] == []


def test_unsupported_architecture_refused_by_name(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["Gemma2ForCausalLM"], "hidden_size": 8}))
    with pytest.raises(HFModelError, match="'Gemma2ForCausalLM' is not supported") as e:
        import_hf(tmp_path, tmp_path / "out")
    assert "\n" not in str(e.value) and not (tmp_path / "out").exists()


def test_corrupt_weights_one_line(tmp_path):
    make_hf_model(tmp_path / "hf", "mistral")
    weights = tmp_path / "hf" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(HFModelError, match="model.safetensors: tensor .* truncated") as e:
        import_hf(tmp_path / "hf", tmp_path / "out")
    assert "\n" not in str(e.value) and not (tmp_path / "out").exists()


def test_missing_config_and_tokenizer_one_line(tmp_path):
    with pytest.raises(HFModelError, match="config.json: missing"):
        import_hf(tmp_path, tmp_path / "out")
    make_hf_model(tmp_path / "hf", "llama-bias")
    (tmp_path / "hf" / "tokenizer.json").unlink()
    with pytest.raises(HFModelError, match="tokenizer.json: missing"):
        import_hf(tmp_path / "hf", tmp_path / "out")


def test_sharded_bfloat16_checkpoint(tmp_path):
    """A model saved in shards (model.safetensors.index.json) and in bfloat16, as large ones are:
    kept in bfloat16 by default, or widened to float32 and then equal to transformers' float32."""
    import shutil

    hf = make_hf_model(tmp_path / "src", "llama-bias").to(torch.bfloat16)
    hf.save_pretrained(tmp_path / "hf", max_shard_size="20KB")
    shutil.copy(tmp_path / "src" / "tokenizer.json", tmp_path / "hf")
    assert (tmp_path / "hf" / "model.safetensors.index.json").exists()
    assert import_hf(tmp_path / "hf", tmp_path / "bf16")["dtype"] == "bfloat16"
    assert load_model(tmp_path / "bf16").tok_emb.weight.dtype == torch.bfloat16
    import_hf(tmp_path / "hf", tmp_path / "fp32", dtype=torch.float32)
    model = load_model(tmp_path / "fp32")
    # the reference loaded afresh: hf.float() would keep RoPE's inv_freq buffer rounded to bfloat16
    want = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    tokens = _tokens(80)
    with torch.no_grad():
        assert (model(tokens)[..., :80] - want(tokens).logits).abs().max().item() < 1e-4


LLAMA = dict(
    architectures=["LlamaForCausalLM"],
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=48,
    vocab_size=64,
)


@pytest.mark.parametrize(
    "change, expected",
    [
        (dict(rope_parameters=dict(rope_type="yarn", factor=4.0)), "rope_type 'yarn' is not supported"),
        (dict(mlp_bias=True), "mlp_bias true is not supported"),
        (dict(hidden_act="gelu"), "hidden_act 'gelu' is not supported"),
        (dict(head_dim=16), "head_dim*num_attention_heads = 16*4 != hidden_size 32"),
        (dict(architectures=["Qwen2ForCausalLM"], use_sliding_window=True), "use_sliding_window true"),
        (dict(architectures=["GemmaForCausalLM"]), "'GemmaForCausalLM' is not supported"),
        (dict(hidden_size="32"), "hidden_size expected an integer, got '32'"),
    ],
)
def test_config_refused_naming_the_field(change, expected):
    from model.hf_config import from_hf

    with pytest.raises(HFModelError, match=expected.replace("(", r"\(").replace("*", r"\*")):
        from_hf({**LLAMA, **change}, "config.json")


def test_transformers4_spelling_of_rope_is_read():
    from model.hf_config import from_hf

    scaling = dict(
        type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=64
    )
    fields, _ = from_hf({**LLAMA, "rope_theta": 500000.0, "rope_scaling": scaling}, "config.json")
    assert (
        fields["rope_theta"] == 500000.0
        and fields["rope_scaling"] == "llama3"
        and fields["rope_original_max_len"] == 64
    )
