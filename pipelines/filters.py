"""Document quality filters: Gopher's quality and repetition rules (Rae et al. 2021, table A1),
in DataTrove's style: each check returns a reason string or None.

`quality_reason(text, cfg)` runs them cheapest first and returns the first failing reason.
Input is text from `pipelines.normalize.normalize_text`. Speed notes (why the code looks
like this): Python-level work per word is what makes DataTrove's version slow, so

* words are split ONCE with `str.split()` (whitespace tokens; punctuation stays attached,
  so "word," and "word" are distinct tokens for the unigram statistics);
* per-character counts (letters, alphanumerics, word starts) come from two `bytes.translate`
  passes over an ASCII "class view" of the text plus `bytes.count`, all C loops;
* n-gram checks count tuples of the already-split (hash-cached) words with Counter, are
  skipped when a bound from the unigram counts shows they cannot fail, and replay Gopher's
  sequential duplicate scan only over positions whose 5-gram occurs twice.

Repetition verdicts equal DataTrove's GopherRepetitionFilter run on the same whitespace
tokens (tested against a port of its code); DataTrove tokenizes with spaCy instead, which
splits punctuation into tokens of its own, so its word-based checks differ slightly.
All results are deterministic: no salted hashes decide anything.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from dataclasses import dataclass, field
from functools import lru_cache
from itertools import compress, repeat
from operator import add, itemgetter, mul

from model.checked import check_fields, require

__all__ = ["QualityConfig", "REASONS", "GOPHER_STOP_WORDS", "quality_reason"]

GOPHER_STOP_WORDS = ("the", "be", "to", "of", "and", "that", "have", "with")
# Leading characters that make a line a bullet-list item (Gopher names only "•"; DataTrove adds "-").
BULLETS = ("•", "‣", "◦", "▪", "▫", "●", "○", "■", "□", "►", "▸", "➢", "-", "*", "–", "—", "·")
ELLIPSES = ("...", "…")
_TOP_NS = (2, 3, 4)
_DUP_NS = (5, 6, 7, 8, 9, 10)


FRACTION = {"ge": 0, "le": 1}  # field metadata of a fraction: checked by model/checked.py


@dataclass(frozen=True)
class QualityConfig:
    """Every threshold of `quality_reason`; defaults are Gopher's unless noted.
    A `max_*_frac` of 1.0 or a `min_*` of 0 disables that check. Every threshold is >= 0 and
    every fraction in [0, 1] (field metadata, checked by `model.checked.check_fields`)."""

    # checked before any splitting: a 20 MB document costs O(1)
    max_chars: int = field(default=1_000_000, metadata={"ge": 1})
    min_words: int = field(default=50, metadata={"ge": 0})
    max_words: int = field(default=100_000, metadata={"ge": 0})
    min_mean_word_length: float = field(default=3.0, metadata={"ge": 0})
    max_mean_word_length: float = field(default=10.0, metadata={"ge": 0})
    # of non-whitespace characters (Memory3 / issue rule)
    max_non_alpha_char_frac: float = field(default=0.7, metadata=FRACTION)
    # "#" per word, and "..." or "…" per word, separately
    max_symbol_word_ratio: float = field(default=0.1, metadata={"ge": 0})
    max_bullet_lines_frac: float = field(default=0.9, metadata=FRACTION)
    max_ellipsis_lines_frac: float = field(default=0.3, metadata=FRACTION)
    min_alpha_words_frac: float = field(default=0.8, metadata=FRACTION)
    # distinct GOPHER_STOP_WORDS present; 0 disables (non-English corpora)
    min_stop_words: int = field(default=2, metadata={"ge": 0, "le": len(GOPHER_STOP_WORDS)})
    # Not in Gopher. Unique-token fraction falls with length (Heaps' law): on FOLDOC's clean
    # entries of 50-80 words it reaches 1.0, of 80-200 words at most 0.94. So it only applies
    # from 100 words, and 0.95 rejects word lists / identifier dumps (FOLDOC's TLA list: 0.998)
    # but no prose entry.
    max_unique_words_frac: float = field(default=0.95, metadata=FRACTION)
    unique_words_min_words: int = field(default=100, metadata={"ge": 0})
    # Not in Gopher. Shannon entropy (bits) of the token distribution. The lowest among
    # FOLDOC's 4,876 entries of >= 50 words is 4.09 (median 5.6-8.4 by length); below 3 bits
    # the text behaves like fewer than 8 equiprobable words: filler such as "buy now buy now".
    min_word_entropy: float = field(default=3.0, metadata={"ge": 0})
    max_dup_line_frac: float = field(default=0.30, metadata=FRACTION)
    max_dup_line_char_frac: float = field(default=0.20, metadata=FRACTION)
    max_dup_para_frac: float = field(default=0.30, metadata=FRACTION)
    max_dup_para_char_frac: float = field(default=0.20, metadata=FRACTION)
    max_top_2gram_char_frac: float = field(default=0.20, metadata=FRACTION)
    max_top_3gram_char_frac: float = field(default=0.18, metadata=FRACTION)
    max_top_4gram_char_frac: float = field(default=0.16, metadata=FRACTION)
    max_dup_5gram_char_frac: float = field(default=0.15, metadata=FRACTION)
    max_dup_6gram_char_frac: float = field(default=0.14, metadata=FRACTION)
    max_dup_7gram_char_frac: float = field(default=0.13, metadata=FRACTION)
    max_dup_8gram_char_frac: float = field(default=0.12, metadata=FRACTION)
    max_dup_9gram_char_frac: float = field(default=0.11, metadata=FRACTION)
    max_dup_10gram_char_frac: float = field(default=0.10, metadata=FRACTION)

    def __post_init__(self) -> None:
        check_fields(self)
        require(self.min_words <= self.max_words, "min_words", f"<= max_words ({self.max_words})", self.min_words)
        require(
            self.min_mean_word_length <= self.max_mean_word_length,
            "min_mean_word_length",
            f"<= max_mean_word_length ({self.max_mean_word_length})",
            self.min_mean_word_length,
        )


REASONS: tuple[str, ...] = (
    "too_long",
    "empty",
    "too_few_words",
    "too_many_words",
    "too_many_symbols",
    "mean_word_length_too_short",
    "mean_word_length_too_long",
    "too_many_non_alpha_chars",
    "too_few_alpha_words",
    "too_many_bullet_lines",
    "too_many_ellipsis_lines",
    "dup_para_frac",
    "dup_para_char_frac",
    "dup_line_frac",
    "dup_line_char_frac",
    "too_few_stop_words",
    "too_many_unique_words",
    "low_word_entropy",
    *(f"top_{n}gram_char_frac" for n in _TOP_NS),
    *(f"dup_{n}gram_char_frac" for n in _DUP_NS),
)

# --- character classes --------------------------------------------------------------------
# The "class view" of a text maps every character to one ASCII byte with the same class:
# whitespace -> " ", letter -> "a", other alphanumeric (digits, numerals) -> "0", anything
# else -> "." . ASCII text is its own view; other characters are mapped through a cache.


@lru_cache(maxsize=1 << 16)
def _class_of(ch: str) -> str:
    return " " if ch.isspace() else "a" if ch.isalpha() else "0" if ch.isalnum() else "."


def _class_run(m: re.Match) -> str:
    return "".join(map(_class_of, m.group()))


_NON_ASCII_RUN = re.compile(r"[^\x00-\x7f]+")
_ASCII = [chr(c) for c in range(128)]
# bytes.translate deletes first, then maps: whitespace -> " ", every surviving byte -> "a".
_TO_SPACE_OR_A = bytes(32 if c < 128 and _ASCII[c].isspace() else 97 for c in range(256))
_DROP_NON_ALNUM = bytes(c for c in range(128) if not (_ASCII[c].isspace() or _ASCII[c].isalnum()))
_DROP_NON_ALPHA = bytes(c for c in range(128) if not (_ASCII[c].isspace() or _ASCII[c].isalpha()))


def _char_counts(text: str) -> tuple[int, int, int, int, int]:
    """(alnum tokens, alnum chars, alpha tokens, letters, whitespace chars), in C loops.

    A token "has a letter" iff something survives deleting its non-letters; in the translated
    bytes each surviving token starts right after a space, so `count(b" a")` counts them.
    """
    view = text if text.isascii() else _NON_ASCII_RUN.sub(_class_run, text)
    b = view.encode("ascii")
    x = b.translate(_TO_SPACE_OR_A, _DROP_NON_ALNUM)
    y = b.translate(_TO_SPACE_OR_A, _DROP_NON_ALPHA)
    ws = x.count(b" ")
    return (
        x.count(b" a") + x.startswith(b"a"),
        len(x) - ws,
        y.count(b" a") + y.startswith(b"a"),
        len(y) - ws,
        ws,
    )


# --- repetition helpers ---------------------------------------------------------------------
_PARA_SPLIT = re.compile(r"\n{2,}")
_ONE = 1


def _dups(items: list[str]) -> tuple[int, int]:
    """Gopher's find_duplicates: (# items equal to an earlier item, their total chars)."""
    uniq = set(items)
    return len(items) - len(uniq), sum(map(len, items)) - sum(map(len, uniq))


def _grams(words: list[str], n: int) -> zip:
    # n-grams as tuples of the (hash-cached) word strings: hashing a tuple never rehashes the
    # characters, unlike DataTrove's " ".join per n-gram.
    return zip(*(words[i:] for i in range(n)))


def _ngram_reason(words: list[str], counts: Counter, text_len: int, cfg: QualityConfig) -> str | None:
    # Comparisons are written as DataTrove writes them (chars / len(text) > frac) so verdicts
    # match its float rounding exactly; every bound B of a quantity Q is used as
    # "B / len <= frac", which implies "Q / len <= frac" since Q <= B.
    n_words = len(words)
    # Bound for the top n-gram: its count is <= the count of each of its words, so its mass
    # count * (sum of word lengths + n - 1) <= n * max_w count(w) * (len(w) + 1).
    # (map over C builtins instead of a generator: this runs for every document)
    vals = counts.values()
    m = max(map(add, map(mul, vals, map(len, counts)), vals))
    for n in _TOP_NS:
        frac = getattr(cfg, f"max_top_{n}gram_char_frac")
        if n_words < n or n * m / text_len <= frac:
            continue
        # Exact, with Counter.most_common(1)'s tie-break (earliest n-gram) as in DataTrove.
        gram, k = max(Counter(_grams(words, n)).items(), key=itemgetter(1))
        if (sum(map(len, gram)) + n - 1) * k / text_len > frac:
            return f"top_{n}gram_char_frac"

    n0 = _DUP_NS[0]
    fracs = [(n, getattr(cfg, f"max_dup_{n}gram_char_frac")) for n in _DUP_NS]
    min_frac = min(f for _, f in fracs)
    # Bound for duplicated n-grams: every counted word repeats an earlier equal word.
    repeated_chars = sum(map(len, words)) - sum(map(len, counts))
    if n_words < n0 or repeated_chars / text_len <= min_frac:
        return None
    c = Counter(_grams(words, n0))
    if len(c) == n_words - n0 + 1:
        return None  # no repeated 5-gram: no longer n-gram repeats either
    # Tighter bound, still without positions: every word Gopher counts for any n >= 5 lies
    # in a 5-gram equal to an earlier one, so the chars of all non-first 5-gram occurrences
    # bound every n's count.
    repeated = list(compress(c, map(_ONE.__lt__, c.values())))
    if sum((c[k] - 1) * sum(map(len, k)) for k in repeated) / text_len <= min_frac:
        return None
    # Positions whose 5-gram occurs more than once; an n-gram can only repeat where its
    # (n-1)-gram prefix does, so the candidate list only shrinks as n grows.
    grams = list(_grams(words, n0))
    repeats = list(map(_ONE.__lt__, map(c.__getitem__, grams)))  # C loops, no genexpr
    cand = list(compress(range(len(grams)), repeats))
    keys = list(compress(grams, repeats))
    for n, frac in fracs:
        if n > n0:
            cand = [i for i in cand if i <= n_words - n]
            keys = [tuple(words[i : i + n]) for i in cand]
            c = Counter(keys)
            repeats = list(map(_ONE.__lt__, map(c.__getitem__, keys)))
            cand = list(compress(cand, repeats))
            keys = list(compress(keys, repeats))
            if not cand:
                return None
        if repeated_chars / text_len > frac and _gopher_dup_chars(cand, keys, n) / text_len > frac:
            return f"dup_{n}gram_char_frac"
    return None


def _gopher_dup_chars(cand: list[int], keys: list[tuple], n: int) -> int:
    """Gopher/DataTrove's find_all_duplicate, visiting only positions whose n-gram repeats:
    an n-gram that occurs once is never "seen before", so skipping it changes nothing. A
    repeat adds its characters (words joined without spaces) and jumps n words, recording
    none of the n-grams it jumps over."""
    seen: set[tuple] = set()
    nxt = total = 0
    for i, k in zip(cand, keys):
        if i < nxt:
            continue
        if k in seen:
            total += sum(map(len, k))
            nxt = i + n
        else:
            seen.add(k)
    return total


# --- the filter -----------------------------------------------------------------------------


def quality_reason(text: str, cfg: QualityConfig = QualityConfig()) -> str | None:
    """First failing reason (a member of REASONS) for `text`, or None if it passes."""
    n_chars = len(text)
    if n_chars > cfg.max_chars:
        return "too_long"
    if not text or text.isspace():
        return "empty"
    words = text.split()  # the one split every word-level check shares
    n_words = len(words)
    if n_words < cfg.min_words:  # raw tokens bound the alphanumeric ones from above
        return "too_few_words"

    limit = cfg.max_symbol_word_ratio * n_words
    if text.count("#") > limit or text.count("...") + text.count("…") > limit:
        return "too_many_symbols"

    alnum_words, alnum_chars, alpha_words, letters, ws = _char_counts(text)
    if alnum_words < cfg.min_words:  # Gopher counts words that are not pure punctuation
        return "too_few_words"
    if alnum_words > cfg.max_words:
        return "too_many_words"
    mean_len = alnum_chars / alnum_words if alnum_words else 0.0  # punctuation stripped, as Gopher's tokenizer does
    if mean_len < cfg.min_mean_word_length:
        return "mean_word_length_too_short"
    if mean_len > cfg.max_mean_word_length:
        return "mean_word_length_too_long"
    if (n_chars - ws - letters) > cfg.max_non_alpha_char_frac * (n_chars - ws):
        return "too_many_non_alpha_chars"
    if alpha_words < cfg.min_alpha_words_frac * n_words:
        return "too_few_alpha_words"

    # map/filter over C methods rather than generator expressions: these run once per line.
    lines = list(filter(None, map(str.strip, text.split("\n"))))
    if lines:
        if sum(map(str.startswith, lines, repeat(BULLETS))) > cfg.max_bullet_lines_frac * len(lines):
            return "too_many_bullet_lines"
        if sum(map(str.endswith, lines, repeat(ELLIPSES))) > cfg.max_ellipsis_lines_frac * len(lines):
            return "too_many_ellipsis_lines"

    if "\n\n" in text:
        paras = _PARA_SPLIT.split(text.strip())
        dup, dup_chars = _dups(paras)
        if dup > cfg.max_dup_para_frac * len(paras):
            return "dup_para_frac"
        if dup_chars > cfg.max_dup_para_char_frac * n_chars:
            return "dup_para_char_frac"
    if len(lines) > 1:
        dup, dup_chars = _dups(lines)
        if dup > cfg.max_dup_line_frac * len(lines):
            return "dup_line_frac"
        if dup_chars > cfg.max_dup_line_char_frac * n_chars:
            return "dup_line_char_frac"

    counts = Counter(words)
    if cfg.min_stop_words:
        present = sum(1 for w in GOPHER_STOP_WORDS if w in counts or w.capitalize() in counts)
        if present < cfg.min_stop_words:
            return "too_few_stop_words"
    if n_words >= cfg.unique_words_min_words and len(counts) > cfg.max_unique_words_frac * n_words:
        return "too_many_unique_words"
    if cfg.min_word_entropy > 0:
        # H = log2 N - (1/N) sum c log2 c
        vals = counts.values()
        s = sum(map(mul, vals, map(math.log2, vals)))
        if math.log2(n_words) - s / n_words < cfg.min_word_entropy:
            return "low_word_entropy"

    return _ngram_reason(words, counts, n_chars, cfg)
