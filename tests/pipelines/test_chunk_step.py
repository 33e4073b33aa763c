"""The chunk step's cut of a document: token ids and reference spans (token and character)."""

from types import SimpleNamespace

from pipelines.chunk_step import _cut
from pipelines.chunking import reference_spans, sentence_boundaries
from pipelines.tokenizer import train_bpe
from tests.conftest import foldoc_records


def test_short_documents_take_the_one_span_path_with_the_same_result():
    texts = [r["text"] for r in foldoc_records(300)] + ["", "x"]
    tok = train_bpe(texts, vocab_size=600)
    chunking = SimpleNamespace(ref_max_tokens=64, ref_min_tokens=16)  # the fields _cut reads
    cuts = _cut(tok, texts, [True] * len(texts), chunking)
    lengths = [len(c["token_ids"]) for c in cuts]
    assert min(lengths) == 0 and sum(n <= 64 for n in lengths) > 50 and sum(n > 64 for n in lengths) > 50
    for text, cut in zip(texts, cuts):
        enc = tok.encode(text, add_special_tokens=False)
        want = [
            [a, b, enc.offsets[a][0], enc.offsets[b - 1][1]]
            for a, b in reference_spans(len(enc.ids), sentence_boundaries(text, enc.offsets), 64, 16)
        ]
        assert cut["token_ids"] == enc.ids and cut["spans"] == want
    assert all(c["spans"] is None for c in _cut(tok, texts[:3], [False] * 3, chunking))
