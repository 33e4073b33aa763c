"""`m3 import-model` and `m3 export-model` as a user runs them (jobs.cli.main.main): the report
lines, the config written beside the checkpoint, one-line errors for what cannot be imported."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from jobs.cli.main import main
from jobs.config import load_config
from model.checkpoint import load_model
from tests.model.hf_fixtures import make_hf_model

pytest.importorskip("transformers")

DEMO = "configs/demo.yaml"


def test_import_model_reports_rows_and_writes_config(tmp_path, capsys):
    make_hf_model(tmp_path / "hf", "llama3")
    out = tmp_path / "m3"
    args = ["--set", f"bank.uri={tmp_path / 'bank'}", "--set", "model.mem_top_k=4", "--out", str(out)]
    assert main(["import-model", str(tmp_path / "hf"), "-c", DEMO, *args]) == 0
    printed = capsys.readouterr().out
    assert "LlamaForCausalLM" in printed and "added <ref> (ref_bos_id) as id 97 on a new row" in printed
    assert "copy of the BOS row (id 1)" in printed
    model = load_model(out)
    derived = yaml.safe_load((out / "m3.yaml").read_text())
    assert derived["train"]["warmup_checkpoint"] == str(out.resolve())
    assert derived["bank"]["uri"] == str(tmp_path / "bank")  # --set travels with it
    cfg = load_config(out / "m3.yaml")  # the whole project config, as every later command reads it
    assert cfg.model == model.config and cfg.model.mem_top_k == 4
    assert cfg.model.rope_scaling == "llama3" and cfg.tokenizer.path == str((out / "tokenizer.json").resolve())
    # the run report names the checkpoint the memory stages start from, and where it came from
    from jobs.ops.run_report import start_lines
    from storage.bank import Bank

    line = start_lines(cfg, Bank.of(cfg), {})[-1]
    # before any training, the bank is encoded by the imported weights, not a fresh init
    from jobs.models import model_for_encoding

    assert model_for_encoding(cfg, Bank.of(cfg)) == out.resolve()
    assert f"start from `{out.resolve()}`" in line and f"imported from `{(tmp_path / 'hf').resolve()}`" in line

    exported = tmp_path / "export"
    assert main(["export-model", str(exported), "-c", str(out / "m3.yaml"), "--checkpoint", str(out)]) == 0
    assert "LlamaForCausalLM" in capsys.readouterr().out
    assert json.loads((exported / "config.json").read_text())["rope_parameters"]["rope_type"] == "llama3"
    import transformers

    back = transformers.AutoModelForCausalLM.from_pretrained(exported, dtype=torch.float32).eval()
    tok = transformers.AutoTokenizer.from_pretrained(exported)  # knows the special tokens by name
    assert (tok.eos_token_id, tok.pad_token_id) == (model.config.eos_id, model.config.pad_id)
    assert tok.convert_tokens_to_ids("<ref>") == model.config.ref_bos_id
    tokens = torch.randint(3, 96, (1, 30))
    with torch.no_grad():
        assert (back(tokens).logits - model(tokens)).abs().max().item() < 1e-4


@pytest.mark.parametrize(
    "setup, expected",
    [
        ("gemma2", "architecture 'Gemma2ForCausalLM' is not supported (supported: LlamaForCausalLM"),
        ("nothing", "config.json: missing"),
        ("truncated", "model.safetensors: not a safetensors file"),
    ],
)
def test_unimportable_directory_is_one_line(tmp_path, capsys, setup, expected):
    src = tmp_path / "hf"
    src.mkdir()
    if setup == "gemma2":
        (src / "config.json").write_text(json.dumps({"architectures": ["Gemma2ForCausalLM"], "model_type": "gemma2"}))
    elif setup == "truncated":
        make_hf_model(src, "qwen2")
        (src / "model.safetensors").write_bytes(b"\x10\x00")
    capsys.readouterr()  # what building the fixture printed
    rc = main(["import-model", str(src), "-c", DEMO, "--set", f"bank.uri={tmp_path / 'bank'}"])
    err = capsys.readouterr().err
    assert rc == 2 and len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert err.startswith("m3 import-model: error: ") and expected in err
    assert not (tmp_path / "bank" / "models").exists() or not any((tmp_path / "bank" / "models").iterdir())
