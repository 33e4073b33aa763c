"""The paper's leakage measure (eq. 6): windowed LCS overlap of a reference with a text.

    overlap(t, r) = max N / |r|, over increasing indices i_1 < ... < i_N in t and
    j_1 < ... < j_N in r with t[i_k] == r[j_k] and i_N - i_1 <= 2|r|.

Training drops a (sequence, reference) pair when the overlap exceeds 0.9, evaluation drops a
retrieved reference above 2/3 (paper §3.6, §4.4). An empty reference has overlap 0.0: it shares
nothing with any text, and 0/0 must not turn into a NaN that every threshold test rejects.

Reduction. A common subsequence whose first and last text indices are at most 2|r| apart lies in
the window t[i_1 : i_1 + 2|r| + 1], and every common subsequence of such a window satisfies the
constraint, so max N = max over s of LCS(r, t[s : s + 2|r| + 1]): the best LCS of r against a
fixed-width window of t. Only windows starting on a token that occurs in r matter, and tokens
of t that do not occur in r can never be matched, so t is first *compressed* to the positions
holding a token of r (the windows keep their widths in original positions).

Algorithm: semi-local LCS by seaweed combing (Tiskin). Comb r (rows) against the compressed t
(columns): each cell holds one strand coming from the left and one from the top; at a match
they swap (do not cross), at a mismatch they cross unless they crossed before (the one with the
smaller id continues right). One pass over the |r| x n' grid gives, for every substring
t'[a:b], LCS(r, t'[a:b]) = (b - a) - #{strands entering at the top in [a, b) and leaving at
the bottom in [a, b)}. Each such strand counts for an interval of window starts, so all window
scores come from one difference array: O(|r| · n') time for all windows together, against
O(|r|² · n') for a DP per window start (bench/overlap.py measures both).

Vectorization. Cells on one anti-diagonal are independent, so the pass is |r| + n' - 1 numpy
steps; the batch axis holds many (reference, text segment) jobs at once so each step works on
|r| x batch elements. A step is branch-free int16 arithmetic: with u = v - h and C = BIG at a
match, 0 elsewhere, w = min(u, C) and (h, v) += (w, -w) is exactly "swap at a match, otherwise
put the smaller id on the horizontal" (masked copies are ~50x slower on random masks). With
few references, the window starts of t are split into segments (each with the columns its
windows reach) so that one reference still fills the batch axis.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

__all__ = [
    "overlap",
    "overlap_many",
    "overlap_rows",
    "overlap_exceeds_rows",
    "overlap_count",
    "overlap_counts",
    "exceeds",
]

# Jobs combed together: enough to amortize the per-step numpy call overhead (about 6 calls per
# anti-diagonal), small enough that one step's slices (|r| x batch int16) stay in L1/L2.
_BATCH = 128
# References prepared at once, and their cap on refs x |t|: bounds the membership and count
# arrays of `_Prepared` (int64 counts: 32 MiB at the cap) for long texts.
_CHUNK = 512
_CHUNK_CELLS = 1 << 22
# When fewer references than this come in, split t into segments to fill the batch axis.
_TARGET_JOBS = 64
# int16 strand ids need |r| + n' <= BIG (u = v - h ranges over +-(|r| + n')).
_BIG16 = 16383


def _tokens(x: Sequence[int], name) -> np.ndarray:
    """x as an int64 array; name (a string, or a callable making one: only on error) for errors."""
    if isinstance(x, np.ndarray) and x.ndim == 1 and x.dtype.kind in "iu":  # the fast path
        return x.astype(np.int64, copy=False)
    a = np.asarray(x)
    name = name() if callable(name) else name
    if a.ndim != 1:
        raise ValueError(f"{name}: expected a 1-D token sequence, got shape {a.shape}")
    if a.size == 0:
        return a.astype(np.int64)
    if a.dtype.kind not in "iub":
        raise TypeError(f"{name}: tokens must be integers, got dtype {a.dtype}")
    return a.astype(np.int64, copy=False)


class _Prepared:
    """Many references, each against one of several texts, as flat arrays (reference k owns
    [off[k], off[k+1])).

    The texts are mapped once to dense ids and padded to a common length with an id that no
    reference token maps to (padding is never matched, so it never enters a compressed text and
    changes no window); reference tokens absent from every text become the row sentinel -2 (they
    can never match). For each reference, its text is compressed to the positions holding one of
    its tokens: `text_ids` are those positions' ids, `ends[a]` is the end (exclusive, in
    compressed positions) of the window starting at compressed a, and `first[x]` the first
    window start whose window reaches compressed x."""

    def __init__(self, texts: "_Texts", refs: list[np.ndarray], text_of: np.ndarray):
        vocab, grid = texts.vocab, texts.grid
        n = grid.shape[1]
        self.vocab_size = len(vocab) + 1  # the padding id too
        self.m = np.array([len(r) for r in refs], np.int64)
        flat = np.concatenate(refs) if refs else np.zeros(0, np.int64)
        at = np.minimum(np.searchsorted(vocab, flat), max(len(vocab) - 1, 0))
        found = vocab[at] == flat if len(vocab) else np.zeros(len(flat), bool)
        self.ref_ids = np.where(found, at, -2)
        self.ref_off = np.concatenate(([0], np.cumsum(self.m)))
        owner = np.repeat(np.arange(len(refs)), self.m)
        member = np.zeros((len(refs), len(vocab) + 1), bool)  # the padding column stays False
        member[owner[found], at[found]] = True
        rows_text = grid[text_of]
        present = np.take_along_axis(member, rows_text, axis=1)
        below = np.zeros((len(refs), n + 1), np.int64)  # compressed positions before i
        np.cumsum(present, axis=1, out=below[:, 1:])
        hit = np.flatnonzero(present)  # row-major: grouped by reference, positions sorted
        rows, pos = np.divmod(hit, n)
        self.off = np.concatenate(([0], np.cumsum(below[:, n])))
        width = (2 * self.m + 1)[rows]  # window t[s : s + width] is exactly |i_N - i_1| <= 2|r|
        self.text_ids = rows_text[rows, pos]
        row_base = rows * (n + 1)
        below = below.ravel()
        self.ends = below[row_base + np.minimum(pos + width, n)]
        self.first = below[row_base + np.maximum(pos - width + 1, 0)]
        # Widest window per reference, in compressed positions (0 for one without matches).
        self.reach = np.zeros(len(refs), np.int64)
        has = np.flatnonzero(self.off[1:] > self.off[:-1])
        if len(has):
            local = np.arange(len(pos)) - self.off[rows]
            self.reach[has] = np.maximum.reduceat(self.ends - local, self.off[has])

    def jobs(self, pieces: int) -> list[tuple[int, int, int, int]]:
        """(reference, first start, end start, end column) per job, starts split in `pieces`."""
        live = np.flatnonzero(self.off[1:] > self.off[:-1])
        if pieces == 1:  # one job per reference, all its starts (the step below is >= n)
            return list(
                zip(
                    live.tolist(),
                    [0] * len(live),
                    (self.off[live + 1] - self.off[live]).tolist(),
                    self.ends[self.off[live + 1] - 1].tolist(),
                )
            )
        out = []
        for k in live:
            n, base = int(self.off[k + 1] - self.off[k]), int(self.off[k])
            # Segments at least one window long comb each column at most twice (their columns
            # are the starts plus one window); shorter ones would comb it more often than that.
            step = max(int(self.reach[k]), -(-n // pieces))
            for s0 in range(0, n, step):
                s1 = min(n, s0 + step)
                out.append((int(k), s0, s1, int(self.ends[base + s1 - 1])))
        return out


def _comb(ref_ids: np.ndarray, text_ids: np.ndarray, dtype, big: int) -> np.ndarray:
    """Seaweed combing of a batch: ref_ids (M, K), text_ids (N, K), padded with sentinels that
    never match. Returns (N, K): the id of the strand leaving the bottom at each column
    (ids 0..M-1: entered on the left at that row; M + j: entered at the top of column j)."""
    m, k = ref_ids.shape
    n = text_ids.shape[0]
    h = np.empty((m, k), dtype)
    h[:] = np.arange(m, dtype=dtype)[:, None]
    # Columns stored reversed so that an anti-diagonal is a contiguous slice of both arrays.
    vr = np.empty((n, k), dtype)
    vr[:] = (m + np.arange(n - 1, -1, -1)).astype(dtype)[:, None]
    text_r = np.ascontiguousarray(text_ids[::-1])
    u_buf = np.empty((m, k), dtype)
    c_buf = np.empty((m, k), dtype)
    eq_buf = np.empty((m, k), bool)
    big = dtype(big)
    for d in range(m + n - 1):
        i0 = max(0, d - n + 1)
        i1 = min(m, d + 1)
        k0 = n - 1 - d + i0
        k1 = k0 + (i1 - i0)
        hh, vv = h[i0:i1], vr[k0:k1]
        c, u, eq = c_buf[: i1 - i0], u_buf[: i1 - i0], eq_buf[: i1 - i0]
        np.equal(ref_ids[i0:i1], text_r[k0:k1], out=eq)
        np.multiply(eq, big, out=c)
        np.subtract(vv, hh, out=u)
        np.minimum(u, c, out=u)
        hh += u
        vv -= u
    return vr[::-1]


def _best(prep: _Prepared, group: list, bottom: np.ndarray, m_pad: int) -> np.ndarray:
    """Max over each job's window starts of LCS(r, window), from the strands leaving the bottom.

    A window [a, ends[a]) contains ends[a] - a columns; its LCS is that minus the strands that
    enter at the top and leave at the bottom inside it. A strand entering at column c and leaving
    at d (c <= d: strands only move down and right) is inside the windows starting in
    [first[d], c], so all counts come from one difference array over the whole group."""
    k, s0, s1, e = (np.array(x, np.int64) for x in zip(*group))
    cols, starts = e - s0, s1 - s0
    n_pad = bottom.shape[0]
    d = np.arange(n_pad)
    # Job-major from here: row j is job j, column d its d-th compressed text position.
    c = bottom.T.astype(np.int64) - m_pad  # entry column of a top strand, else < 0
    at = np.minimum(prep.off[k] + s0 + d[:, None], len(prep.first) - 1).T
    begin = np.maximum(prep.first[at] - s0[:, None], 0)
    stop = np.minimum(c, starts[:, None] - 1) + 1
    live = (c >= 0) & (d < cols[:, None]) & (begin < stop)
    soff = np.concatenate(([0], np.cumsum(starts + 1)))  # one spare slot per job
    size = int(soff[-1])
    job_base = soff[:-1, None]
    # Every +1 has its -1 inside the same job's slots, so one cumsum serves all jobs.
    inside = np.cumsum(
        np.bincount((job_base + begin)[live], minlength=size) - np.bincount((job_base + stop)[live], minlength=size)
    )
    slot_job = np.repeat(np.arange(len(group)), starts + 1)
    a = np.arange(size) - soff[slot_job] + s0[slot_job]  # window start, compressed
    span = prep.ends[np.minimum(prep.off[k[slot_job]] + a, len(prep.ends) - 1)] - a
    score = span - inside
    score[soff[1:] - 1] = 0  # the spare slots
    return np.maximum.reduceat(score, soff[:-1])


class _Texts:
    """Texts as one (texts, longest) grid of dense ids over their joint vocabulary (sorted),
    padded with len(vocab): an id that no reference token maps to."""

    def __init__(self, texts: list[np.ndarray]):
        lens = np.array([len(t) for t in texts], np.int64)
        flat = np.concatenate(texts) if texts else np.zeros(0, np.int64)
        self.vocab, dense = np.unique(flat, return_inverse=True)
        self.grid = np.full((len(texts), int(lens.max(initial=0))), len(self.vocab), np.int64)
        self.grid[np.arange(self.grid.shape[1]) < lens[:, None]] = dense.ravel()


def _counts(texts: list[np.ndarray], refs: list[np.ndarray], text_of: np.ndarray, batch: int) -> np.ndarray:
    """max N of eq. 6 of refs[i] against texts[text_of[i]], all pairs combed together."""
    if batch < 1:
        raise ValueError(f"batch: must be >= 1, got {batch}")
    out = np.zeros(len(refs), np.int64)
    tx = _Texts(texts)
    n = tx.grid.shape[1]
    if n == 0 or not refs:
        return out
    chunk = max(1, min(_CHUNK, _CHUNK_CELLS // n))
    for c0 in range(0, len(refs), chunk):
        prep = _Prepared(tx, refs[c0 : c0 + chunk], text_of[c0 : c0 + chunk])
        live = int(np.count_nonzero(prep.off[1:] > prep.off[:-1]))
        jobs = prep.jobs(max(1, _TARGET_JOBS // max(live, 1)))
        # Similar shapes together: padding costs as much as real cells.
        jobs.sort(key=lambda j: (prep.m[j[0]], j[3] - j[1]), reverse=True)
        for g in range(0, len(jobs), batch):
            group = jobs[g : g + batch]
            k, s0, _, e = (np.array(x, np.int64) for x in zip(*group))
            m_k, n_k = prep.m[k], e - s0
            m_pad, n_pad = int(m_k.max()), int(n_k.max())
            small = m_pad + n_pad <= _BIG16 and prep.vocab_size <= _BIG16
            dtype, big = (np.int16, _BIG16) if small else (np.int32, 1 << 30)
            # Sentinels -2 (rows) and -1 (columns) never match each other or a dense id >= 0.
            ref_ids = np.full((m_pad, len(group)), -2, dtype)
            text_ids = np.full((n_pad, len(group)), -1, dtype)
            row = np.arange(m_pad)[:, None]
            inside = row < m_k
            ref_ids[inside] = prep.ref_ids[(prep.ref_off[k] + row)[inside]]
            col = np.arange(n_pad)[:, None]
            inside = col < n_k
            text_ids[inside] = prep.text_ids[(prep.off[k] + s0 + col)[inside]]
            best = _best(prep, group, _comb(ref_ids, text_ids, dtype, big), m_pad)
            np.maximum.at(out, c0 + k, best)
    return out


def overlap_counts(t: Sequence[int], refs: Sequence[Sequence[int]], *, batch: int = _BATCH) -> np.ndarray:
    """max N of eq. 6 for each reference against t (int64 array, one entry per reference)."""
    tt = _tokens(t, "t")
    rs = [_tokens(r, f"refs[{i}]") for i, r in enumerate(refs)]
    return _counts([tt], rs, np.zeros(len(rs), np.int64), batch)


def _flat_rows(texts, refs) -> tuple[list[np.ndarray], list[np.ndarray], np.ndarray, np.ndarray]:
    """(texts, every reference flat, references per text, each reference's text index)."""
    if len(texts) != len(refs):
        raise ValueError(f"{len(texts)} texts but {len(refs)} reference lists")
    tt = [_tokens(t, f"texts[{i}]") for i, t in enumerate(texts)]
    rs = [_tokens(r, lambda i=i, j=j: f"refs[{i}][{j}]") for i, row in enumerate(refs) for j, r in enumerate(row)]
    sizes = np.array([len(row) for row in refs], np.int64)
    return tt, rs, sizes, np.repeat(np.arange(len(texts)), sizes)


def overlap_rows(
    texts: Sequence[Sequence[int]], refs: Sequence[Sequence[Sequence[int]]], *, batch: int = _BATCH
) -> list[np.ndarray]:
    """Eq. 6 overlap of each of refs[i] with texts[i], for every i: the same values as
    `[overlap_many(t, rs) for t, rs in zip(texts, refs)]`, with every pair of every text combed
    in one pass (a swap point's whole batch: one call instead of one per row)."""
    tt, rs, sizes, text_of = _flat_rows(texts, refs)
    counts = _counts(tt, rs, text_of, batch)
    m = np.array([len(r) for r in rs], np.float64)
    ratios = np.divide(counts, m, out=np.zeros(len(rs)), where=m > 0)
    return np.split(ratios, np.cumsum(sizes)[:-1]) if len(texts) else []


def _count_bounds(tx: _Texts, refs: list[np.ndarray], text_of: np.ndarray) -> np.ndarray:
    """An upper bound on max N for each pair (refs[i], texts[text_of[i]]): the most tokens any
    window of 2|r| + 1 text positions shares with r as multisets, max over windows of
    sum_v min(#v in the window, #v in r). A common subsequence inside a window matches each
    token of r at most as often as r holds it.

    Vectorized like `_best`: a text position x holding token v of r counts for exactly the window
    starts p with x - 2|r| <= p <= x that do not also hold the #v-in-r previous occurrences of v,
    i.e. p > that occurrence's position: an interval of starts, so all bounds come from one
    difference array over every pair."""
    vocab, grid = tx.vocab, tx.grid
    P, n = len(refs), grid.shape[1]
    m = np.array([len(r) for r in refs], np.int64)
    flat = np.concatenate(refs) if refs else np.zeros(0, np.int64)
    at = np.minimum(np.searchsorted(vocab, flat), max(len(vocab) - 1, 0))
    found = vocab[at] == flat if len(vocab) else np.zeros(len(flat), bool)
    owner = np.repeat(np.arange(P), m)
    in_ref = np.zeros((P, len(vocab) + 1), np.int64)  # the padding column stays 0
    np.add.at(in_ref, (owner[found], at[found]), 1)
    rows_text = grid[text_of]
    need = np.take_along_axis(in_ref, rows_text, axis=1)
    row, pos = np.divmod(np.flatnonzero(need), n)
    tok, need = rows_text[row, pos], need[row, pos]
    order = np.lexsort((pos, tok, row))  # each (pair, token)'s occurrences in text order
    row, pos, tok, need = row[order], pos[order], tok[order], need[order]
    idx = np.arange(len(pos))
    new_group = np.ones(len(pos), bool)
    new_group[1:] = (row[1:] != row[:-1]) | (tok[1:] != tok[:-1])
    group_start = np.maximum.accumulate(np.where(new_group, idx, 0))
    back = idx - need  # the occurrence #v-in-r steps back, if it is in the same group
    blocked = np.where(back >= group_start, pos[np.maximum(back, 0)] + 1, 0)
    lo = np.maximum(blocked, pos - 2 * m[row])
    slots = n + 1
    diff = np.bincount(row * slots + lo, minlength=P * slots) - np.bincount(row * slots + pos + 1, minlength=P * slots)
    return np.cumsum(diff.reshape(P, slots), axis=1).max(axis=1, initial=0)


def overlap_exceeds_rows(
    texts: Sequence[Sequence[int]], refs: Sequence[Sequence[Sequence[int]]], threshold: float, *, batch: int = _BATCH
) -> list[np.ndarray]:
    """For each i, whether each of refs[i] overlaps texts[i] more than threshold: exactly
    `overlap_rows(texts, refs)[i] > threshold` (the same float comparison), combing only the
    pairs whose multiset bound (`_count_bounds`) does not already rule it out. On decode's
    candidates the bound settles ~94 % of the pairs (a filter needs the verdict, not the value)."""
    threshold = float(threshold)
    if threshold != threshold:
        raise ValueError("threshold: must be a number, got NaN")
    tt, rs, sizes, text_of = _flat_rows(texts, refs)
    m = np.array([len(r) for r in rs], np.float64)
    if threshold < 0.0:  # every overlap is >= 0.0
        out = np.ones(len(rs), bool)
    else:  # an empty reference or text (overlap 0.0) stays False
        out = np.zeros(len(rs), bool)
        tx = _Texts(tt)
        if tx.grid.shape[1] and rs:
            bound = np.divide(_count_bounds(tx, rs, text_of), m, out=np.zeros(len(rs)), where=m > 0)
            maybe = np.flatnonzero(bound > threshold)
            if len(maybe):
                out[maybe] = _counts(tt, [rs[i] for i in maybe], text_of[maybe], batch) / m[maybe] > threshold
    return np.split(out, np.cumsum(sizes)[:-1]) if len(texts) else []


def overlap_many(t: Sequence[int], refs: Sequence[Sequence[int]], *, batch: int = _BATCH) -> np.ndarray:
    """Eq. 6 overlap of each reference with t (float64 array in [0, 1]; 0.0 for an empty one).
    One call for many references is much faster per pair than separate `overlap` calls."""
    counts = overlap_counts(t, refs, batch=batch)
    sizes = np.array([len(r) for r in refs], np.float64)
    return np.divide(counts, sizes, out=np.zeros(len(refs)), where=sizes > 0)


def overlap_count(t: Sequence[int], r: Sequence[int]) -> int:
    """max N of eq. 6: the longest common subsequence of r and a window of 2|r| + 1 tokens of t."""
    return int(overlap_counts(t, [r])[0])


def overlap(t: Sequence[int], r: Sequence[int]) -> float:
    """Eq. 6 overlap of reference r with text t, in [0, 1]; 0.0 when r is empty."""
    return float(overlap_many(t, [r])[0])


def exceeds(t: Sequence[int], r: Sequence[int], threshold: float) -> bool:
    """overlap(t, r) > threshold (training filters at 0.9, evaluation at 2/3), with the same
    float comparison as `overlap`, so both always agree. Skips the combing when counting r's
    tokens in the best window of t already proves the answer is no."""
    threshold = float(threshold)
    if threshold != threshold:
        raise ValueError("threshold: must be a number, got NaN")
    tt, rr = _tokens(t, "t"), _tokens(r, "r")
    m = len(rr)
    if m == 0 or len(tt) == 0:
        return 0.0 > threshold
    # Upper bound on max N: tokens of r in the fullest window, at most |r|.
    present = np.isin(tt, rr)
    csum = np.concatenate(([0], np.cumsum(present)))
    width = min(2 * m + 1, len(tt))
    bound = min(m, int((csum[width:] - csum[:-width]).max()))
    if bound / m <= threshold:
        return False
    return overlap_count(tt, rr) / m > threshold
