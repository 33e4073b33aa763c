"""The tokenizer reserves the ids the model relies on and hashes stably."""

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers

from pipelines.tokenizer import SPECIAL_TOKENS, TokenizerError, from_json, load, tokenizer_hash, train_bpe
from tests.conftest import foldoc_records


@pytest.fixture(scope="module")
def texts():
    return [r["text"] for r in foldoc_records(300)]


def test_trained_bpe_has_fixed_special_ids_and_round_trips(texts):
    tok = train_bpe(texts, vocab_size=700)
    assert [tok.token_to_id(t) for t in SPECIAL_TOKENS] == [0, 1, 2, 3]
    assert tok.get_vocab_size() == 700
    enc = tok.encode(texts[5], add_special_tokens=False)
    assert tok.decode(enc.ids) == texts[5]  # byte-level: lossless, whatever the text
    assert min(enc.ids) >= len(SPECIAL_TOKENS)


def test_training_is_deterministic_and_hash_is_stable(texts, tmp_path):
    a, b = train_bpe(texts, 600), train_bpe(texts, 600)
    assert tokenizer_hash(a) == tokenizer_hash(b)
    assert tokenizer_hash(a) != tokenizer_hash(train_bpe(texts, 650))
    path = tmp_path / "tokenizer.json"
    a.save(str(path))
    assert tokenizer_hash(load(str(path))) == tokenizer_hash(a)
    assert tokenizer_hash(from_json(a.to_str())) == tokenizer_hash(a)


def test_foreign_tokenizer_without_our_special_ids_is_refused(tmp_path):
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel()
    tok.add_special_tokens(["<s>", "<pad>"])
    path = tmp_path / "t.json"
    tok.save(str(path))
    with pytest.raises(TokenizerError, match="'<pad>' must have id 0"):
        load(str(path))
    (tmp_path / "bad.json").write_text("{not a tokenizer")
    with pytest.raises(TokenizerError, match="not a readable tokenizer.json"):
        load(str(tmp_path / "bad.json"))
