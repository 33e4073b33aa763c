"""MinHash signatures and LSH band keys for near-duplicate detection.

Pure numpy; one call handles a whole batch of documents, so a Ray Data stage calls
``signatures`` once per batch and ``band_keys`` on the result.

Words. Text is lowercased (``str.lower``) and encoded as UTF-8; a word is a maximal run of
word bytes, where word bytes are ASCII letters, digits and ``_`` plus every non-ASCII byte,
except that U+00A0 (no-break space) and U+2000..U+203F (typographic spaces, dashes, curly
quotes, bullets, ellipsis) separate words like ASCII punctuation and whitespace do. So
``"Cache-line, (CACHE line)"`` gives ``cache line cache line``, and curly versus straight
quotes do not change the words. Non-ASCII letters (é, ß, CJK) stay inside words; a script
without spaces (Chinese) is then one long "word" per run, which is a known weakness we accept
for this corpus. A run longer than ``_MAX_WORD`` bytes is cut into ``_MAX_WORD``-byte words:
that bounds memory on binary junk and changes nothing for real words.

Shingles are ``ngram`` consecutive words; a document with fewer than ``ngram`` words has one
shingle made of all its words (none for a document without words: every word-less
document gets the same signature, consistent with their word sequences being equal).

Hashing is fully vectorized and deterministic across processes and machines (never Python's
salted ``hash``): words are hashed with a polynomial rolling hash over the byte buffer of
the whole batch (prefix sums, so one pass in numpy), mixed with the splitmix64 finalizer;
shingles are a mixed linear combination of their word hashes; the ``bands * rows``
permutations are ``a_j * x + b_j mod 2**64`` with odd ``a_j`` (bijections on uint64),
applied to blocks of shingles at once, followed by a per-document min (``minimum.reduceat``).
All constants come from a splitmix64 stream seeded by ``MinHashConfig.seed`` in pure
Python, so they do not depend on numpy's RNG either.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from model.checked import check_fields, require

__all__ = ["MinHashConfig", "signatures", "band_keys", "mix64"]

_MASK64 = (1 << 64) - 1
_GOLDEN = 0x9E3779B97F4A7C15
_MAX_WORD = 256  # bytes; longer runs are cut (see module docstring)
# Byte budget of one word-hashing slice and shingle count of one permutation block: both
# bound the temporaries (8 bytes/byte and 8*bands*rows bytes/shingle) and keep blocks in cache.
_SLICE_BYTES = 1 << 20
_BLOCK_SHINGLES = 4096
# Odd multiplier of the rolling word hash and its inverse mod 2**64 (exists since it is odd).
_POLY = 0x100000001B3 * 2 + 1
_POLY_INV = pow(_POLY, -1, 1 << 64)


@dataclasses.dataclass(frozen=True)
class MinHashConfig:
    """MinHash-LSH parameters: ``bands * rows`` permutations; a pair with Jaccard ``s`` shares
    at least one band with probability ``1 - (1 - s**rows)**bands``."""

    ngram: int = dataclasses.field(default=5, metadata={"ge": 1, "le": 64})
    bands: int = dataclasses.field(default=14, metadata={"ge": 1, "le": 1024})
    rows: int = dataclasses.field(default=8, metadata={"ge": 1, "le": 1024})
    seed: int = dataclasses.field(default=1, metadata={"ge": 0, "le": _MASK64})

    def __post_init__(self) -> None:
        check_fields(self)
        require(self.bands * self.rows <= 4096, "rows", f"bands * rows <= 4096 (bands={self.bands})", self.rows)

    @property
    def num_perm(self) -> int:
        return self.bands * self.rows

    @property
    def approx_threshold(self) -> float:
        """Jaccard at which the collision probability curve is steepest, ``(1/b)**(1/r)``."""
        return (1.0 / self.bands) ** (1.0 / self.rows)


def _mix64_int(x: int) -> int:
    x &= _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def _constants(seed: int, tag: int, n: int) -> np.ndarray:
    """n pseudo-random uint64 from a splitmix64 stream keyed by (seed, tag)."""
    state = _mix64_int(_mix64_int(seed) ^ (tag * _GOLDEN))
    out = []
    for _ in range(n):
        state = (state + _GOLDEN) & _MASK64
        out.append(_mix64_int(state))
    return np.array(out, dtype=np.uint64)


def mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64 finalizer on a uint64 array (a bijection; returns a new array)."""
    x = np.asarray(x, dtype=np.uint64)
    x = x ^ (x >> np.uint64(30))
    x *= np.uint64(0xBF58476D1CE4E5B9)
    x ^= x >> np.uint64(27)
    x *= np.uint64(0x94D049BB133111EB)
    x ^= x >> np.uint64(31)
    return x


# Byte classes: True for bytes that belong to words (see module docstring).
_WORD_BYTE = np.zeros(256, dtype=bool)
_WORD_BYTE[[ord(c) for c in "abcdefghijklmnopqrstuvwxyz0123456789_"]] = True
_WORD_BYTE[0x80:] = True

_POW_CACHE: dict[str, np.ndarray] = {}


def _powers(n: int) -> tuple[np.ndarray, np.ndarray]:
    """P**i and P**-i mod 2**64 for i < n (cached; grown by doubling)."""
    pw = _POW_CACHE.get("pow")
    if pw is None or len(pw) < n:
        size = 1 << max(16, (int(n) - 1).bit_length())  # next power of two: few regrowths
        pw = np.full(size, _POLY, dtype=np.uint64)
        pw[0] = 1
        pw = np.cumprod(pw, dtype=np.uint64)  # wraps mod 2**64, which is what we want
        inv = np.full(size, _POLY_INV, dtype=np.uint64)
        inv[0] = 1
        inv = np.cumprod(inv, dtype=np.uint64)
        _POW_CACHE["pow"], _POW_CACHE["inv"] = pw, inv
    return _POW_CACHE["pow"], _POW_CACHE["inv"]


def _word_mask(buf: np.ndarray) -> np.ndarray:
    is_word = _WORD_BYTE[buf]
    # U+2000..U+203F is E2 80 xx; U+00A0 is C2 A0: separators, not word bytes.
    for lead, second, width in ((0xE2, 0x80, 3), (0xC2, 0xA0, 2)):
        hits = np.flatnonzero((buf[:-1] == lead) & (buf[1:] == second))
        for k in range(width):
            is_word[np.minimum(hits + k, len(buf) - 1)] = False
    return is_word


def _words(buf: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Start and end (exclusive) byte offsets of every word in ``buf``."""
    is_word = _word_mask(buf)
    edges = np.diff(is_word.view(np.int8), prepend=np.int8(0), append=np.int8(0))
    starts = np.flatnonzero(edges == 1)
    ends = np.flatnonzero(edges == -1)
    long = (ends - starts) > _MAX_WORD
    if long.any():  # rare: cut runs into _MAX_WORD-byte words
        pieces = np.where(long, (ends - starts + _MAX_WORD - 1) // _MAX_WORD, 1)
        first = np.repeat(np.cumsum(pieces) - pieces, pieces)
        k = np.arange(pieces.sum()) - first
        run_start = np.repeat(starts, pieces)
        run_end = np.repeat(ends, pieces)
        starts = run_start + k * _MAX_WORD
        ends = np.minimum(starts + _MAX_WORD, run_end)
    return starts, ends


def _word_hashes(buf: np.ndarray, starts: np.ndarray, ends: np.ndarray) -> np.ndarray:
    """Mixed polynomial hash of each word's bytes, computed slice by slice."""
    out = np.empty(len(starts), dtype=np.uint64)
    i = 0
    while i < len(starts):
        lo = int(starts[i])
        # every word is <= _MAX_WORD bytes, so at least one word fits in the slice
        j = max(int(np.searchsorted(ends, lo + _SLICE_BYTES, side="right")), i + 1)
        hi = int(ends[j - 1])
        pw, inv = _powers(hi - lo + 1)
        prefix = np.zeros(hi - lo + 1, dtype=np.uint64)
        np.cumsum(buf[lo:hi].astype(np.uint64) * pw[: hi - lo], out=prefix[1:])
        s, e = starts[i:j] - lo, ends[i:j] - lo
        # (H[e] - H[s]) * P**-s = sum_k byte[s+k] * P**k: position-independent word hash
        out[i:j] = (prefix[e] - prefix[s]) * inv[s] + (e - s).astype(np.uint64)
        i = j
    return mix64(out)


def _texts_to_buffer(texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    encoded = [t.lower().encode("utf-8", "surrogatepass") for t in texts]
    # "\n" between documents is a separator byte, so no word spans two documents
    lengths = np.fromiter((len(b) + 1 for b in encoded), dtype=np.int64, count=len(encoded))
    doc_starts = np.cumsum(lengths) - lengths
    buf = np.frombuffer(b"\n".join(encoded) + b"\n", dtype=np.uint8)
    return buf, doc_starts


def signatures(texts: list[str], cfg: MinHashConfig = MinHashConfig()) -> np.ndarray:
    """MinHash signatures, uint64 of shape ``(len(texts), cfg.bands * cfg.rows)``.

    A row depends only on its text and ``cfg``: not on the batch it came in, the process or
    the machine. Memory is bounded by the slice/block sizes plus ~40 bytes per word.
    """
    n, n_perm, ngram = len(texts), cfg.num_perm, cfg.ngram
    sigs = np.full((n, n_perm), np.iinfo(np.uint64).max, dtype=np.uint64)
    if n == 0:
        return sigs
    buf, doc_starts = _texts_to_buffer(texts)
    starts, ends = _words(buf)
    word_hash = _word_hashes(buf, starts, ends)
    word_doc = np.searchsorted(doc_starts, starts, side="right") - 1
    n_words = np.bincount(word_doc, minlength=n)
    word_off = np.cumsum(n_words) - n_words
    # every document has >= 1 shingle, so reduceat segments are never empty
    n_shingles = np.where(n_words >= ngram, n_words - ngram + 1, 1)
    sh_off = np.cumsum(n_shingles) - n_shingles
    total = int(n_shingles.sum())

    coef = _constants(cfg.seed, 1, ngram + 1)  # per-position word weights, last one for length
    mult = _constants(cfg.seed, 2, n_perm) | np.uint64(1)  # odd: a bijection of uint64
    add = _constants(cfg.seed, 3, n_perm)
    # word_hash padded with one zero so out-of-document positions of short docs read 0
    padded = np.append(word_hash, np.uint64(0))
    for lo in range(0, total, _BLOCK_SHINGLES):
        hi = min(lo + _BLOCK_SHINGLES, total)
        idx = np.arange(lo, hi)
        doc = np.searchsorted(sh_off, idx, side="right") - 1
        first = word_off[doc] + (idx - sh_off[doc])
        length = np.minimum(n_words[doc], ngram)
        acc = length.astype(np.uint64) * coef[ngram]
        for k in range(ngram):
            pos = np.where(k < length, first + k, len(word_hash))
            acc += padded[pos] * coef[k]
        shingle = mix64(acc)
        perm = np.multiply.outer(shingle, mult)
        perm += add
        # segments of this block: one per document that has shingles in it
        seg_docs = doc[np.r_[True, doc[1:] != doc[:-1]]]  # doc is sorted
        seg_starts = np.maximum(sh_off[seg_docs], lo) - lo
        mins = np.minimum.reduceat(perm, seg_starts, axis=0)
        np.minimum(sigs[seg_docs], mins, out=mins)
        sigs[seg_docs] = mins
    return sigs


def band_keys(sigs: np.ndarray, cfg: MinHashConfig = MinHashConfig()) -> np.ndarray:
    """One int64 LSH key per band, shape ``(n, cfg.bands)``.

    The band index sits in the low ``ceil(log2(bands))`` bits and a hash of the band's rows in
    the rest, so equal rows in different bands can never give equal keys.
    """
    sigs = np.asarray(sigs, dtype=np.uint64)
    if sigs.ndim != 2 or sigs.shape[1] != cfg.num_perm:
        raise ValueError(
            f"sigs must have shape (n, {cfg.num_perm}) for bands={cfg.bands}, rows={cfg.rows}; got {sigs.shape}"
        )
    n = sigs.shape[0]
    bits = max(1, (cfg.bands - 1).bit_length())
    rows = sigs.reshape(n, cfg.bands, cfg.rows)
    acc = np.broadcast_to(_constants(cfg.seed, 4, cfg.bands), (n, cfg.bands)).copy()
    for r in range(cfg.rows):
        acc = mix64(acc ^ rows[:, :, r])
    band = np.arange(cfg.bands, dtype=np.uint64)
    keys = ((acc >> np.uint64(bits)) << np.uint64(bits)) | band
    return keys.view(np.int64)
