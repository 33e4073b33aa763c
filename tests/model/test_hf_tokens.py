"""An imported model's tokenizer is the bank's: pipelines/tokenizer.py accepts it by its `<ref>`,
and holds the model section's special ids to it."""

from __future__ import annotations

import dataclasses

import pytest

from model.checkpoint import load_model
from model.hf_import import import_hf
from pipelines.tokenizer import TokenizerError, check_model_ids, load, own_layout
from tests.model.hf_fixtures import make_hf_model

pytest.importorskip("transformers")


def test_imported_tokenizer_loads_and_matches_its_model(tmp_path):
    make_hf_model(tmp_path / "hf", "mistral")
    import_hf(tmp_path / "hf", tmp_path / "m3")
    tok = load(tmp_path / "m3" / "tokenizer.json")  # not the project's ids 0-3, and accepted
    cfg = load_model(tmp_path / "m3").config
    assert not own_layout(tok) and tok.token_to_id("<ref>") == cfg.ref_bos_id
    assert check_model_ids(tok, cfg, "t") is tok
    # the text tokenizes as the model's own tokenizer did: <ref> is a special token, never split
    assert tok.encode("w5 w7").ids == [5, 7] and tok.encode("<ref>").ids == [cfg.ref_bos_id]
    with pytest.raises(TokenizerError, match=r"<ref> token has id \d+, model.ref_bos_id is 3"):
        check_model_ids(tok, dataclasses.replace(cfg, pad_id=60, ref_bos_id=3), "t")


def test_tokenizer_without_ref_or_own_ids_is_refused(tmp_path):
    make_hf_model(tmp_path / "hf", "mistral")
    with pytest.raises(TokenizerError, match="special token '<pad>' must have id 0"):
        load(tmp_path / "hf" / "tokenizer.json")


def test_bank_cut_with_another_tokenizer_is_refused(tmp_path):
    """An imported model on a bank cut with the project's own tokenizer (`m3 ingest` forgotten)
    and the project's model on a bank cut with an imported tokenizer: both refused, naming it."""
    from tokenizers import Tokenizer

    from pipelines.tokenizer import check_bank_tokenizer, train_bpe

    make_hf_model(tmp_path / "hf", "qwen2")
    import_hf(tmp_path / "hf", tmp_path / "m3")
    imported = load_model(tmp_path / "m3").config
    own = train_bpe(["a compiler is a program"] * 50, vocab_size=300)
    with pytest.raises(TokenizerError, match=r"project's own tokenizer .* run `m3 ingest`"):
        check_bank_tokenizer(own, imported, "m")
    theirs = Tokenizer.from_file(str(tmp_path / "m3" / "tokenizer.json"))
    assert check_bank_tokenizer(theirs, imported, "m") is theirs
    project = dataclasses.replace(imported, pad_id=0, bos_id=1, eos_id=2, ref_bos_id=3)
    with pytest.raises(TokenizerError, match="<ref> token has id 92, model.ref_bos_id is 3"):
        check_bank_tokenizer(theirs, project, "m")
