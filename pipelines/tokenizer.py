"""The byte-level BPE tokenizer: trained on the clean corpus, or loaded from a local file.

Its special tokens have fixed ids that the model relies on (model.ModelConfig: pad 0, bos 1,
eos 2, ref_bos 3). `<ref>` stands for the paper's "<s>Reference:" prefix: one dedicated token
is cheaper than four and cannot collide with text that happens to read "Reference:".

A pretrained model's tokenizer (`m3 import-model`, model/hf_tokens.py) keeps its own ids: it is
accepted when it has a `<ref>` token, and the model section names its pad, bos, eos and
`<ref>` ids (check_model_ids holds the two to each other).
"""

from __future__ import annotations

import hashlib
from typing import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from model.errors import M3Error

SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<ref>")
PAD_ID, BOS_ID, EOS_ID, REF_BOS_ID = range(4)


class TokenizerError(M3Error, ValueError):
    pass


def train_bpe(texts: Iterable[str], vocab_size: int, min_frequency: int = 2) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def own_layout(tok: Tokenizer) -> bool:
    """The project's own special ids (0-3), as train_bpe makes them."""
    return all(tok.token_to_id(t) == i for i, t in enumerate(SPECIAL_TOKENS))


def check_special_tokens(tok: Tokenizer, where: str) -> Tokenizer:
    if not own_layout(tok) and tok.token_to_id("<ref>") not in (None, REF_BOS_ID):
        return tok  # an imported model's tokenizer: its ids are the model section's (check_model_ids)
    for expected, token in enumerate(SPECIAL_TOKENS):
        got = tok.token_to_id(token)
        if got != expected:
            raise TokenizerError(
                f"{where}: special token {token!r} must have id {expected}, has {got}; "
                f"the model reserves ids 0-3 for {', '.join(SPECIAL_TOKENS)}"
            )
    return tok


def check_model_ids(tok: Tokenizer, model, where: str) -> Tokenizer:
    """The model config's special ids are this tokenizer's: `<ref>` at ref_bos_id, and every id
    (and the tokenizer's whole vocabulary) inside the model's embedding. The project's own
    tokenizers are checked by check_special_tokens alone, as before."""
    if own_layout(tok):
        return tok
    ref = tok.token_to_id("<ref>")
    if ref != model.ref_bos_id:
        raise TokenizerError(
            f"{where}: its <ref> token has id {ref}, model.ref_bos_id is {model.ref_bos_id}: the model "
            f"section must be the one `m3 import-model` printed for this tokenizer"
        )
    n = tok.get_vocab_size(with_added_tokens=True)
    if n > model.vocab_size:
        raise TokenizerError(f"{where}: {n} tokens, more than model.vocab_size={model.vocab_size}")
    return tok


def check_bank_tokenizer(tok: Tokenizer, model, where: str) -> Tokenizer:
    """A model may read a bank only if the bank was cut with the model's tokenizer: an imported
    model's ids on the project's own tokenizer (an `m3 ingest` forgotten after `m3 import-model`)
    would train on the wrong tokens without an error."""
    ids = (model.pad_id, model.bos_id, model.eos_id, model.ref_bos_id)
    if own_layout(tok) and ids != (PAD_ID, BOS_ID, EOS_ID, REF_BOS_ID):
        raise TokenizerError(
            f"{where}: the bank was cut with the project's own tokenizer (special ids 0-3), the model "
            f"uses pad/bos/eos/<ref> = {ids}: run `m3 ingest` with the config `m3 import-model` wrote"
        )
    return check_model_ids(tok, model, where)


def load(path) -> Tokenizer:
    """A tokenizer.json at a local path or a bank URI."""
    from storage.layout import upath

    try:
        tok = Tokenizer.from_str(upath(path).read_text(encoding="utf-8"))
    except Exception as e:  # noqa: BLE001 - the library raises a bare Exception on bad files
        raise TokenizerError(f"{path}: not a readable tokenizer.json: {e}") from None
    return check_special_tokens(tok, path)


def from_json(text: str) -> Tokenizer:
    return Tokenizer.from_str(text)


def tokenizer_hash(tok: Tokenizer) -> str:
    """Hash of the serialized tokenizer: same vocabulary and merges, same hash."""
    return hashlib.blake2b(tok.to_str().encode(), digest_size=8).hexdigest()
