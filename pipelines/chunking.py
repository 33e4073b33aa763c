"""Cutting tokenized documents into references and packing them into training sequences.

Pure python/numpy on plain data (token counts, boundary indices, char offsets, id lists), so it
is testable without a tokenizer. With a HuggingFace ``tokenizers`` encoding ``enc`` of ``text``:

    bounds = sentence_boundaries(text, enc.offsets)
    spans = reference_spans(len(enc.ids), bounds, max_tokens=128, min_tokens=32)
    refs = [enc.ids[a:b] for a, b in spans]   # text of a ref: text[offsets[a][0]:offsets[b-1][1]]

References never cross a document (one call per document); training sequences do (documents
are concatenated with an EOS separator, as in the paper's pretraining).
"""

from __future__ import annotations

import re
from collections import deque
from collections.abc import Iterable, Iterator, Sequence

import numpy as np

__all__ = ["reference_spans", "sentence_boundaries", "Packer", "pack_sequences"]


def reference_spans(
    n_tokens: int, boundary_after: Sequence[int] | np.ndarray, max_tokens: int = 128, min_tokens: int = 32
) -> list[tuple[int, int]]:
    """Split token indices ``[0, n_tokens)`` into consecutive half-open spans.

    Spans cover every token exactly once, in order, are never empty and hold at most
    ``max_tokens`` tokens. A span starting at ``s`` ends right after a sentence boundary (token
    index ``b`` in ``boundary_after``, end ``b + 1``) when some boundary gives a length in
    ``[min_tokens, max_tokens]``, choosing the latest such; otherwise it is cut at
    ``s + max_tokens``. When the rest of the document fits (``n_tokens - s <= max_tokens``) it
    is one span: the end of the text is the best boundary there is. ``min_tokens`` keeps a
    boundary early in the window from producing a uselessly short reference.
    Boundaries may be unsorted, repeated or out of range; they are cleaned here.
    """
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
    if not 1 <= min_tokens <= max_tokens:
        raise ValueError(f"min_tokens must be in [1, max_tokens={max_tokens}], got {min_tokens}")
    if n_tokens < 0:
        raise ValueError(f"n_tokens must be >= 0, got {n_tokens}")
    # work with candidate span *ends* (index after the boundary token), inside (0, n)
    ends = np.unique(np.asarray(boundary_after, dtype=np.int64).ravel() + 1)
    ends = ends[(ends > 0) & (ends < n_tokens)]
    spans: list[tuple[int, int]] = []
    start = 0
    while start < n_tokens:
        if n_tokens - start <= max_tokens:
            end = n_tokens
        else:
            # latest candidate end <= start + max_tokens; take it if it is >= start + min_tokens
            i = int(np.searchsorted(ends, start + max_tokens, side="right")) - 1
            if i >= 0 and ends[i] >= start + min_tokens:
                end = int(ends[i])
            else:
                end = start + max_tokens
        spans.append((start, end))
        start = end
    return spans


# A sentence ends after . ! or ? (optionally followed by closing quotes or brackets) when
# whitespace or the end of the text follows, and after every newline. Abbreviations ("e.g. x")
# are false positives we accept: the cost is a slightly earlier cut inside the window.
_SENTENCE_END = re.compile(r"[.!?][\"')\]}\u2019\u201d]{0,3}(?=\s|\Z)|\n")


def sentence_boundaries(text: str, offsets: Sequence[tuple[int, int]] | np.ndarray) -> np.ndarray:
    """Indices (int64, sorted) of the tokens after which a sentence ends.

    ``offsets`` are the tokenizer's ``(start, end)`` character offsets into ``text``, one per
    token (``Encoding.offsets``). Token ``i`` is a boundary when a sentence end (see
    ``_SENTENCE_END``: ``.``/``!``/``?`` plus closers, followed by whitespace or the end of the
    text, or a newline) lies inside or at the end of the token and only whitespace follows it
    within the token, so both ``"."`` and byte-level merges like ``".\\n\\n  "`` qualify.
    When several tokens share an end offset (a multi-byte character split over byte-level
    tokens), only the last of them can be a boundary; tokens with empty spans (special
    tokens, offsets ``(0, 0)``) never are.
    """
    off = np.asarray(offsets, dtype=np.int64).reshape(-1, 2)
    n = len(off)
    if n == 0 or not text:
        return np.empty(0, dtype=np.int64)
    marks = np.fromiter((m.end() for m in _SENTENCE_END.finditer(text)), dtype=np.int64)
    if len(marks) == 0:
        return np.empty(0, dtype=np.int64)
    start = np.clip(off[:, 0], 0, len(text))
    end = np.clip(off[:, 1], 0, len(text))
    # latest sentence end p <= token end, which must lie inside the token
    j = np.searchsorted(marks, end, side="right") - 1
    p = marks[np.maximum(j, 0)]
    ok = (j >= 0) & (p > start) & (end > start)
    ok[:-1] &= end[:-1] != end[1:]  # last token of a split character
    # only whitespace may follow p inside the token; p < end is rare (merged whitespace
    # tokens), so a Python check there is cheaper than a per-character array over the text
    for i in np.flatnonzero(ok & (p < end)).tolist():
        ok[i] = text[p[i] : end[i]].isspace()
    return np.flatnonzero(ok).astype(np.int64)


class Packer:
    """Packs documents into training sequences of exactly ``seq_len`` tokens.

    Each document contributes its token ids followed by ``eos_id`` (also for an empty
    document, so the separator count equals the document count). Documents may span
    sequence boundaries. ``add`` returns the sequences completed so far as dicts
    ``{"token_ids": list[int], "doc_ids": list[str]}`` (``doc_ids``: the documents that
    contribute tokens to the sequence, in order, each once). The tokens still buffered
    when the input ends are not emitted: ``leftover`` counts them and ``leftover_doc_ids``
    names their documents, for the run report.

    ``align`` > 0 starts every document at a multiple of ``align`` tokens, the gap after its EOS
    filled with ``pad_id`` (counted in the document's segment). With align = the memory chunk
    size, a document's first chunk retrieves its memories with its own text alone and never
    shares them with the end of the previous document; the loss ignores the padding.
    """

    def __init__(self, seq_len: int = 2048, eos_id: int = 2, align: int = 0, pad_id: int = 0):
        if seq_len < 1:
            raise ValueError(f"seq_len must be >= 1, got {seq_len}")
        if align < 0 or (align and seq_len % align):
            raise ValueError(f"align must be 0 or divide seq_len={seq_len}, got {align}")
        self.seq_len = seq_len
        self.eos_id = eos_id
        self.align, self.pad_id = align, pad_id
        self._added = 0  # tokens added so far: where the next document starts, modulo align
        self._buf: list[int] = []
        self._pos = 0  # tokens of _buf already emitted (compacted lazily: no O(n^2) slicing)
        self._segments: deque[list] = deque()  # [doc_id, tokens not yet emitted]

    @property
    def leftover(self) -> int:
        return len(self._buf) - self._pos

    @property
    def leftover_doc_ids(self) -> list[str]:
        return [doc_id for doc_id, _ in self._segments]

    def add(self, doc_id: str, token_ids: Sequence[int] | np.ndarray) -> list[dict]:
        ids = token_ids.tolist() if isinstance(token_ids, np.ndarray) else list(token_ids)
        self._buf.extend(ids)
        self._buf.append(self.eos_id)
        n = len(ids) + 1
        if self.align:
            gap = -(self._added + n) % self.align
            self._buf.extend([self.pad_id] * gap)
            n += gap
        self._added += n
        self._segments.append([doc_id, n])
        out = []
        while len(self._buf) - self._pos >= self.seq_len:
            out.append(self._emit())
        if self._pos:
            del self._buf[: self._pos]
            self._pos = 0
        return out

    def _emit(self) -> dict:
        token_ids = self._buf[self._pos : self._pos + self.seq_len]
        self._pos += self.seq_len
        need, doc_ids = self.seq_len, []
        while need:
            segment = self._segments[0]
            take = min(segment[1], need)
            doc_ids.append(segment[0])
            segment[1] -= take
            need -= take
            if segment[1] == 0:
                self._segments.popleft()
        return {"token_ids": token_ids, "doc_ids": doc_ids}


def pack_sequences(
    docs: Iterable[tuple[str, Sequence[int]]], seq_len: int = 2048, eos_id: int = 2, packer: Packer | None = None
) -> Iterator[dict]:
    """Yield full sequences (see ``Packer``) from ``(doc_id, token_ids)`` pairs, in order.

    The trailing partial sequence is dropped; pass your own ``packer`` to read
    ``packer.leftover`` afterwards (the generator also returns it, for ``yield from``).
    """
    packer = packer if packer is not None else Packer(seq_len, eos_id)
    for doc_id, ids in docs:
        yield from packer.add(doc_id, ids)
    return packer.leftover
