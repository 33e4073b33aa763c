"""Reference spans, sentence boundaries and sequence packing: invariants by property tests."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipelines.chunking import Packer, pack_sequences, reference_spans, sentence_boundaries

FIXTURE = Path(__file__).parent / "fixtures" / "foldoc_excerpts.txt"


# --- reference_spans ------------------------------------------------------------------------


@st.composite
def span_inputs(draw):
    n = draw(st.integers(0, 1500))
    max_tokens = draw(st.integers(1, 200))
    min_tokens = draw(st.integers(1, max_tokens))
    bounds = draw(st.lists(st.integers(-3, n + 3), max_size=max(1, n // 5)))
    return n, bounds, max_tokens, min_tokens


@settings(max_examples=300, deadline=None)
@given(span_inputs())
def test_reference_spans_invariants(args):
    n, bounds, max_tokens, min_tokens = args
    spans = reference_spans(n, bounds, max_tokens, min_tokens)
    # full coverage, exactly once, in order, never empty, never longer than max_tokens
    assert [i for a, b in spans for i in range(a, b)] == list(range(n))
    assert all(0 < b - a <= max_tokens for a, b in spans)
    ends = {b + 1 for b in bounds if 0 <= b < n - 1}  # candidate span ends inside the doc
    for start, end in spans:
        if n - start <= max_tokens:  # the rest fits: one last span
            assert end == n and (start, end) == spans[-1]
            continue
        window = [e for e in ends if start + min_tokens <= e <= start + max_tokens]
        # boundary preference: the latest boundary in the window, else a hard cut at max
        assert end == (max(window) if window else start + max_tokens)


def test_reference_spans_examples():
    # boundaries after tokens 39 and 99: with 128/32 the first span ends after token 99
    assert reference_spans(300, [39, 99], 128, 32) == [(0, 100), (100, 228), (228, 300)]
    # a boundary too early (length 10 < min 32) is ignored
    assert reference_spans(200, [9], 128, 32) == [(0, 128), (128, 200)]
    assert reference_spans(0, [], 128, 32) == []
    assert reference_spans(5, np.array([1, 3]), 128, 32) == [(0, 5)]


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"max_tokens": 0}, "max_tokens"),
        ({"min_tokens": 0}, "min_tokens"),
        ({"max_tokens": 10, "min_tokens": 11}, "min_tokens"),
        ({"n_tokens": -1}, "n_tokens"),
    ],
)
def test_reference_spans_rejects_bad_arguments(kwargs, match):
    args = {"n_tokens": 10, "boundary_after": [], **kwargs}
    with pytest.raises(ValueError, match=match):
        reference_spans(**args)


# --- sentence_boundaries --------------------------------------------------------------------


def tokenize(text: str) -> list[tuple[int, int]]:
    """A toy tokenizer: words with their leading spaces, single punctuation, newline runs."""
    return [m.span() for m in re.finditer(r" ?\w+|\n+ *|[^\w\s]| +", text)]


def boundary_tokens(text: str, offsets=None) -> list[str]:
    offsets = tokenize(text) if offsets is None else offsets
    idx = sentence_boundaries(text, offsets)
    assert idx.dtype == np.int64
    return [text[slice(*offsets[i])] for i in idx]


def test_sentence_boundaries_examples():
    text = 'It works. Does it? Yes! Pi is 3.14 and e.g. "quoted." (Paren.) End.\nNext line\n\nLast'
    assert boundary_tokens(text) == [".", "?", "!", ".", '"', ")", ".", "\n", "\n\n"]
    assert boundary_tokens("No end") == []
    assert boundary_tokens("") == []


def test_sentence_boundaries_merged_tokens_and_special_tokens():
    text = "One.\n\n  Two. Three"
    # byte-level style merges: ".\n\n  " ends with whitespace after the sentence end
    offsets = [(0, 0), (0, 3), (3, 8), (8, 11), (11, 12), (12, 18), (0, 0)]
    assert sentence_boundaries(text, offsets).tolist() == [2, 4]
    # a multi-byte character split over two tokens sharing offsets: only the last can count
    text = "hi.\u201d Ok"  # closing curly quote, three UTF-8 bytes
    offsets = [(0, 2), (2, 3), (3, 4), (3, 4), (4, 7)]
    assert sentence_boundaries(text, offsets).tolist() == [3]
    assert sentence_boundaries("A. B", np.array([[0, 2], [2, 4]])).tolist() == [0]


@settings(max_examples=150, deadline=None)
@given(st.text(alphabet="ab .!?\n\"')", max_size=80))
def test_sentence_boundaries_char_tokens_match_rule(text):
    # one token per character: the boundaries are exactly the characters that end a sentence
    offsets = [(i, i + 1) for i in range(len(text))]
    got = sentence_boundaries(text, offsets).tolist()
    expected = []
    for i, ch in enumerate(text):
        after = text[i + 1 :]
        ends_here = (
            ch == "\n" or (not after or after[0].isspace()) and bool(re.search(r"[.!?][\"')]{0,3}$", text[: i + 1]))
        )
        if ends_here:
            expected.append(i)
    assert got == expected


def test_with_a_real_byte_level_bpe_tokenizer():
    import tokenizers  # a core dependency: its absence is a failure, not a skip

    text = FIXTURE.read_text(encoding="utf-8")
    tok = tokenizers.Tokenizer(tokenizers.models.BPE())
    tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(
        vocab_size=400, initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator([text], trainer)
    doc = text.split("\n## ")[1].split("\n", 1)[1]  # one whole excerpt, several paragraphs
    enc = tok.encode(doc)
    bounds = sentence_boundaries(doc, enc.offsets)
    assert len(bounds) >= 10
    for i in bounds:
        s, e = enc.offsets[i]
        assert re.search(r"([.!?][\"')\]]*\s*|\n\s*)$", doc[s:e])
    spans = reference_spans(len(enc.ids), bounds, 128, 32)
    assert [t for a, b in spans for t in enc.ids[a:b]] == enc.ids
    # most references end at a sentence end (this text has many)
    at_boundary = sum(b - 1 in set(bounds.tolist()) for _, b in spans[:-1])
    assert at_boundary >= (len(spans) - 1) // 2
    # the text of a reference is recovered from the offsets
    a, b = spans[0]
    assert tok.decode(enc.ids[a:b]) == doc[enc.offsets[a][0] : enc.offsets[b - 1][1]]


# --- packing --------------------------------------------------------------------------------

docs_strategy = st.lists(
    st.tuples(st.text(alphabet="abcdef", min_size=1, max_size=4), st.lists(st.integers(3, 1000), max_size=40)),
    max_size=25,
)


@settings(max_examples=300, deadline=None)
@given(docs_strategy, st.integers(1, 50))
def test_packing_conserves_tokens_and_separators(docs, seq_len):
    eos = 2
    packer = Packer(seq_len, eos)
    seqs = list(pack_sequences(docs, packer=packer))
    stream = [t for _, ids in docs for t in [*ids, eos]]
    emitted = [t for s in seqs for t in s["token_ids"]]
    assert all(len(s["token_ids"]) == seq_len for s in seqs)
    assert len(emitted) + packer.leftover == len(stream)
    assert 0 <= packer.leftover < seq_len
    assert emitted == stream[: len(emitted)]  # every token once, in order
    # doc_ids: the documents owning the tokens of each sequence, in order, each once
    owner = [i for i, (_, ids) in enumerate(docs) for _ in range(len(ids) + 1)]
    for k, s in enumerate(seqs):
        owners = owner[k * seq_len : (k + 1) * seq_len]
        expected = [docs[i][0] for j, i in enumerate(owners) if j == 0 or owners[j - 1] != i]
        assert s["doc_ids"] == expected
    rest = owner[len(emitted) :]
    assert packer.leftover_doc_ids == [docs[i][0] for j, i in enumerate(rest) if j == 0 or rest[j - 1] != i]


def test_pack_sequences_returns_leftover_and_accepts_numpy():
    def run():
        left = yield from pack_sequences([("a", np.arange(10, 15)), ("b", [7, 8])], seq_len=4)
        return left

    gen, seqs = run(), []
    try:
        while True:
            seqs.append(next(gen))
    except StopIteration as stop:
        leftover = stop.value
    assert seqs == [
        {"token_ids": [10, 11, 12, 13], "doc_ids": ["a"]},
        {"token_ids": [14, 2, 7, 8], "doc_ids": ["a", "b"]},
    ]
    assert leftover == 1
    assert all(type(t) is int for s in seqs for t in s["token_ids"])


def test_long_document_spans_many_sequences():
    packer = Packer(seq_len=2048, eos_id=0)
    out = packer.add("big", range(10_000))
    assert len(out) == 4 and all(s["doc_ids"] == ["big"] for s in out)
    assert packer.leftover == 10_001 - 4 * 2048
    out = packer.add("small", [1] * 2000)
    assert len(out) == 1 and out[0]["doc_ids"] == ["big", "small"]
    assert packer.leftover_doc_ids == ["small"]
    with pytest.raises(ValueError, match="seq_len"):
        Packer(seq_len=0)


@settings(max_examples=300, deadline=None)
@given(docs_strategy, st.sampled_from([1, 2, 4, 8]), st.integers(1, 6))
def test_aligned_packing_starts_every_document_on_a_chunk(docs, align, chunks):
    """chunking.align_docs: each document (and nothing else) starts at a multiple of align,
    its tokens and EOS in order, only padding between; every token once."""
    eos, pad, seq_len = 2, 0, align * chunks
    packer = Packer(seq_len, eos, align=align, pad_id=pad)
    stream = [t for s in pack_sequences(docs, packer=packer) for t in s["token_ids"]]
    pos = 0
    for _, ids in docs:
        if pos >= len(stream):
            break
        assert pos % align == 0
        body = [*ids, eos]
        assert stream[pos : pos + len(body)] == body[: len(stream) - pos]
        end = pos + len(body)
        nxt = -(-end // align) * align
        assert all(t == pad for t in stream[end:nxt])
        pos = nxt
    assert pos >= len(stream) or packer.leftover == 0 or pos > len(stream) - seq_len


def test_aligned_packing_pads_between_documents():
    packer = Packer(seq_len=8, eos_id=2, align=4, pad_id=0)
    out = packer.add("a", [10, 11]) + packer.add("b", [12, 13, 14, 15]) + packer.add("c", [16])
    assert out == [
        {"token_ids": [10, 11, 2, 0, 12, 13, 14, 15], "doc_ids": ["a", "b"]},
        {"token_ids": [2, 0, 0, 0, 16, 2, 0, 0], "doc_ids": ["b", "c"]},
    ]
    assert packer.leftover == 0
    with pytest.raises(ValueError, match="align"):
        Packer(seq_len=6, align=4)
