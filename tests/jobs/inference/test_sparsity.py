"""Which answer tokens a memory's heads keep (jobs/inference/sparsity.py): an answer found as whole
words in a reference's text maps to the right tokens, and the kept share counts the model's own
top-k selection (token t of a reference at position t + 1, behind ref_bos), per reference and
token-weighted."""

from __future__ import annotations

import gzip
import json

import torch

from jobs.inference.sparsity import answer_positions, kept_shares
from pipelines.tokenizer import train_bpe
from tests.conftest import FACTS
from tests.model.helpers import make_model

TEXT = "Shyzer is a town in the plains, founded in 1723. It has 71404 inhabitants and lies on the river Vyrtind."


def test_an_answer_maps_to_the_tokens_of_its_whole_word_occurrences():
    with gzip.open(FACTS / "bank.jsonl.gz", "rt", encoding="utf-8") as f:
        tok = train_bpe((json.loads(line)["text"] for _, line in zip(range(500), f)), 600)
    ids = tok.encode(TEXT, add_special_tokens=False).ids
    for answer in (" 1723", "the plains", " Vyrtind", "71404"):
        pos = answer_positions(tok, TEXT, ids, answer)
        assert pos == list(range(pos[0], pos[-1] + 1))  # one run of tokens
        assert tok.decode([ids[t] for t in pos]).strip() == answer.strip()
    assert answer_positions(tok, TEXT, ids, "172") == []  # a number inside another is no answer
    assert answer_positions(tok, TEXT, ids[:-1] + [7], " 1723") is None  # stored ids not this text's


def test_kept_shares_count_each_head_s_top_k():
    model = make_model()
    cfg = model.config
    gen = torch.Generator().manual_seed(0)
    refs = {
        "a": torch.randint(4, cfg.vocab_size, (12,), generator=gen).tolist(),
        "b": torch.randint(4, cfg.vocab_size, (6,), generator=gen).tolist(),
    }
    # b asked about twice: counted twice; a: its first and last tokens
    wanted = [("a", [0, 11]), ("b", [2]), ("b", [2])]
    got = kept_shares(model, refs, wanted, [1, 2, 12])
    assert got[12]["heads"] == [[1.0] * cfg.n_kv_heads] * cfg.n_mem_layers  # every token kept
    assert got[12]["chance"] == 1.0
    assert got[2]["chance"] == round((2 * 2 / 12 + 2 * 2 / 6) / 4, 4)
    for k in (1, 2):
        with torch.no_grad():
            pos = {r: model.encode_references(torch.tensor([t]), top_k=k).positions[0] for r, t in refs.items()}
        for layer in range(cfg.n_mem_layers):
            for head in range(cfg.n_kv_heads):
                kept = sum(int(p + 1 in pos[r][layer, head].tolist()) for r, ps in wanted for p in ps)
                assert got[k]["heads"][layer][head] == round(kept / 4, 4)
    # one token kept per head: of a's 12 positions, exactly one
    one = kept_shares(model, refs, [("a", list(range(12)))], [1])
    assert one[1]["heads"] == [[round(1 / 12, 4)] * cfg.n_kv_heads] * cfg.n_mem_layers
