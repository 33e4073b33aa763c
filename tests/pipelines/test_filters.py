import dataclasses
import gzip
import json
import math
from collections import Counter
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from model.checked import FieldError
from pipelines import filters
from pipelines.filters import REASONS, QualityConfig, quality_reason
from pipelines.normalize import normalize_text

# Real text: two entries of FOLDOC, the Free On-line Dictionary of Computing
# (https://foldoc.org, editor Denis Howe; GNU FDL 1.1 or later), as normalize_text leaves them.
COMPILER = normalize_text("""compiler

   <programming, tool> A program that converts another program
   from some {source language} (or {programming language}) to
   {machine language} (object code).  Some compilers output
   {assembly language} which is then converted to {machine
   language} by a separate {assembler}.

   A compiler is distinguished from an assembler by the fact that
   each input statement does not, in general, correspond to a
   single machine instruction or fixed sequence of instructions.
   A compiler may support such features as automatic allocation
   of variables, arbitrary arithmetic expressions, control
   structures such as FOR and WHILE loops, variable {scope},
   input/ouput operations, {higher-order functions} and
   {portability} of source code.

   {AUTOCODER}, written in 1952, was possibly the first primitive
   compiler.  {Laning and Zierler}'s compiler, written in
   1953-1954, was possibly the first true working algebraic
   compiler.

   See also {byte-code compiler}, {native compiler}, {optimising
   compiler}.

   (1994-11-07)
""")
BUBBLE = normalize_text("""bubble sort

   A sorting technique in which pairs of adjacent values in the
   list to be sorted are compared and interchanged if they are
   out of order; thus, list entries "bubble upward" in the list
   until they bump into one with a lower sort value.  Because it
   is not very good relative to other methods and is the one
   typically stumbled on by {naive} and untutored programmers,
   hackers consider it the {canonical} example of a naive
   algorithm.  The canonical example of a really *bad* algorithm
   is {bogo-sort}.  A bubble sort might be used out of ignorance,
   but any use of bogo-sort could issue only from brain damage or
   willful perversity.

   [{Jargon File}]
""")
# One line of prose with no repeated 5-gram, used as filler around crafted defects.
PROSE = " ".join(BUBBLE.split())
CFG = QualityConfig()
OFF = {
    f.name: (1.0 if f.name.endswith("_frac") else 0)
    for f in dataclasses.fields(QualityConfig)
    if f.name.startswith(("max_dup", "max_top"))
}


def words_text(n, word="word"):
    return " ".join(f"{word}{i}" for i in range(n))


# ---- clean text ------------------------------------------------------------------------------


@pytest.mark.parametrize("text", [COMPILER, BUBBLE, PROSE])
def test_clean_real_text_passes(text):
    assert quality_reason(text, CFG) is None


def test_shipped_corpus_mostly_passes():
    path = Path(__file__).resolve().parents[2] / "data" / "foldoc" / "foldoc.jsonl.gz"
    assert path.exists(), "the demo corpus ships with the repository"
    reasons = Counter()
    with gzip.open(path, "rt", encoding="utf-8") as f:
        for line in f:
            text = normalize_text(json.loads(line)["text"])
            if len(text.split()) >= 100:
                reasons[quality_reason(text, CFG)] += 1
    assert set(reasons) <= set(REASONS) | {None}
    assert reasons[None] >= 0.97 * sum(reasons.values()), reasons


# ---- one crafted document per reason ------------------------------------------------------------

CASES = {
    "too_long": ("a " * 600_000, {}),
    "empty": (" \n\t ", {}),
    "too_few_words": ("A program that converts another program.", {}),
    "too_many_words": (PROSE, {"max_words": 60}),
    "too_many_symbols": (PROSE + " #tag" * 14, {}),
    "mean_word_length_too_short": ("the of " + " ".join("abcdefghijklmnopqrstuvwxyz" * 3), {}),
    "mean_word_length_too_long": ("the of " + words_text(60, "internationalization"), {}),
    "too_many_non_alpha_chars": ("the of " + " ".join(str(10_000 + i) for i in range(60)), {}),
    "too_few_alpha_words": ("the of " + " ".join(f"alphabet {i}" for i in range(40)), {}),
    "too_many_bullet_lines": ("\n".join(f"- the item of {w} is long enough" for w in PROSE.split()[:12]), {}),
    "too_many_ellipsis_lines": (
        "\n".join(PROSE.split()[i] + " of the entries in this list trail off into nothing at all..." for i in range(8)),
        {},
    ),
    "dup_para_frac": ("\n\n".join([COMPILER, BUBBLE, BUBBLE, BUBBLE]), {}),
    "dup_para_char_frac": ("\n\n".join([COMPILER] + [f"Short note {i}." for i in range(10)] + [COMPILER]), {}),
    "dup_line_frac": ("\n".join(PROSE.split()[:4] * 3 + [PROSE]), {}),
    "dup_line_char_frac": ("\n".join([PROSE] + [f"note {i}" for i in range(6)] + [PROSE]), {}),
    "too_few_stop_words": (" ".join(w for w in PROSE.split() if w.lower() not in filters.GOPHER_STOP_WORDS), {}),
    "too_many_unique_words": ("the of " + words_text(120, "term"), {}),
    "low_word_entropy": (" ".join(["the", "cat", "of", "house", "dog", "and"] * 12), {}),
    "top_2gram_char_frac": (PROSE + " hash table" * 30, {}),
    "top_3gram_char_frac": (PROSE + " of an internationalization" * 10, {}),
    "top_4gram_char_frac": (PROSE + " a an the internationalization" * 7, {}),
    "dup_5gram_char_frac": (PROSE + " " + PROSE, {}),
}
# Duplicated 6..10-grams: a repeated block is repeated for every n, so isolate each n.
for _n in range(6, 11):
    CASES[f"dup_{_n}gram_char_frac"] = (PROSE + " " + PROSE, {**OFF, f"max_dup_{_n}gram_char_frac": 0.1})


def test_every_reason_has_a_case():
    assert set(CASES) == set(REASONS)
    assert len(set(REASONS)) == len(REASONS)


@pytest.mark.parametrize("reason", list(CASES))
def test_reason_triggered(reason):
    text, overrides = CASES[reason]
    assert quality_reason(text, dataclasses.replace(CFG, **overrides)) == reason


def test_20mb_document_is_rejected_without_splitting(monkeypatch):
    text = "x" * 20_000_000
    monkeypatch.setattr(filters, "_char_counts", None)  # would raise if reached
    assert quality_reason(text, CFG) == "too_long"


def test_stop_word_check_can_be_disabled():
    text, _ = CASES["too_few_stop_words"]
    assert quality_reason(text, dataclasses.replace(CFG, min_stop_words=0)) is None


def test_checks_can_be_disabled():
    text, _ = CASES["dup_5gram_char_frac"]
    assert quality_reason(text, dataclasses.replace(CFG, **OFF)) is None
    text, _ = CASES["low_word_entropy"]
    relaxed = dataclasses.replace(CFG, min_word_entropy=0.0, **OFF)
    assert quality_reason(text, relaxed) is None


# ---- boundaries -------------------------------------------------------------------------------


def test_min_words_boundary():
    base = PROSE.split()
    assert quality_reason(" ".join(base[:50]), CFG) is None
    assert quality_reason(" ".join(base[:49]), CFG) == "too_few_words"
    # pure punctuation tokens do not count as words (Gopher)
    assert quality_reason(" ".join(base[:49]) + " -", CFG) == "too_few_words"


def test_max_chars_boundary():
    text = PROSE
    assert quality_reason(text, dataclasses.replace(CFG, max_chars=len(text))) is None
    assert quality_reason(text, dataclasses.replace(CFG, max_chars=len(text) - 1)) == "too_long"


def _distinct_words(length, count):
    letters = "bcdfghjklmnpqrstvwxz"
    return [
        "".join(letters[(i // 20**k) % 20] for k in range(length)) + ","  # the comma is not counted
        for i in range(count)
    ]


def test_mean_word_length_boundaries():
    cfg = dataclasses.replace(CFG, min_stop_words=0)
    assert quality_reason(" ".join(_distinct_words(3, 60)), cfg) is None
    assert quality_reason(" ".join(_distinct_words(10, 60)), cfg) is None
    assert quality_reason(" ".join(_distinct_words(11, 60)), cfg) == "mean_word_length_too_long"
    assert quality_reason(" ".join(_distinct_words(2, 60)), cfg) == "mean_word_length_too_short"


def test_symbol_ratio_boundary():
    n = len(PROSE.split())
    k = n // 9  # k / (n + k) <= 0.1
    assert quality_reason(PROSE + " #" * k, CFG) is None
    assert quality_reason(PROSE + " #" * (k + 2), CFG) == "too_many_symbols"
    assert quality_reason(PROSE + " …" * (k + 2), CFG) == "too_many_symbols"


def test_stop_words_capitalized_count():
    text = "The " + " ".join(w for w in PROSE.split() if w.lower() not in filters.GOPHER_STOP_WORDS) + " With"
    assert quality_reason(text, CFG) is None


# ---- config -----------------------------------------------------------------------------------


def test_config_fields_are_plain_and_frozen():
    for f in dataclasses.fields(QualityConfig):
        assert f.type in ("int", "float", "bool"), f.name
        assert isinstance(getattr(CFG, f.name), {"int": int, "float": float, "bool": bool}[f.type])
    with pytest.raises(dataclasses.FrozenInstanceError):
        CFG.min_words = 3  # type: ignore[misc]
    assert CFG.min_words == 50 and CFG.max_chars == 1_000_000 and CFG.max_non_alpha_char_frac == 0.7
    assert (CFG.max_top_2gram_char_frac, CFG.max_dup_10gram_char_frac) == (0.20, 0.10)


@pytest.mark.parametrize(
    "field, value",
    [
        ("max_dup_line_frac", 1.5),
        ("min_words", -1),
        ("min_words", 2.5),
        ("max_chars", 0),
        ("min_word_entropy", float("nan")),
        ("min_stop_words", True),
        ("min_stop_words", 9),
        ("min_words", 10**6),
    ],
)
def test_config_rejects_bad_values(field, value):
    with pytest.raises(FieldError) as e:
        QualityConfig(**{field: value})
    assert e.value.field == field and field in str(e.value)


# ---- reference implementations and properties ----------------------------------------------------


def _ref_char_counts(text):
    words = text.split()
    return (
        sum(any(c.isalnum() for c in w) for w in words),
        sum(c.isalnum() for c in text),
        sum(any(c.isalpha() for c in w) for w in words),
        sum(c.isalpha() for c in text),
        sum(c.isspace() for c in text),
    )


@given(st.text(alphabet=st.characters(exclude_categories=("Cs",)), max_size=200))
@settings(max_examples=300, deadline=None)
def test_char_counts_match_per_char_reference(text):
    assert filters._char_counts(text) == _ref_char_counts(text)


@given(st.text(alphabet=st.sampled_from("ab1 .\n\t#-•…é日٣\u00a0"), max_size=300))
@settings(max_examples=300, deadline=None)
def test_char_counts_match_on_dense_classes(text):
    assert filters._char_counts(text) == _ref_char_counts(text)


def _ref_ngram_reason(words, text_len, cfg):
    """DataTrove's GopherRepetitionFilter n-gram part, verbatim logic, on the same words."""
    for n in (2, 3, 4):
        grams = [" ".join(words[i : i + n]) for i in range(len(words) - n + 1)]
        if grams:
            top, count = Counter(grams).most_common(1)[0]
            if len(top) * count / text_len > getattr(cfg, f"max_top_{n}gram_char_frac"):
                return f"top_{n}gram_char_frac"
    for n in range(5, 11):
        unique, repeated, idx = set(), 0, 0
        while idx < len(words) - n + 1:
            g = "".join(words[idx : idx + n])
            if g in unique:
                repeated += len(g)
                idx += n
            else:
                unique.add(g)
                idx += 1
        if repeated / text_len > getattr(cfg, f"max_dup_{n}gram_char_frac"):
            return f"dup_{n}gram_char_frac"
    return None


# Equal-length words, so DataTrove's "".join keys cannot collide ("ab"+"c" == "a"+"bc").
repetitive = st.lists(st.sampled_from(["aa", "bb", "cc", "dd", "ee", "ff"]), min_size=1, max_size=300)


@given(repetitive, st.integers(0, 400))
@settings(max_examples=400, deadline=None)
def test_ngram_checks_match_datatrove(words, pad):
    text = " ".join(words) + " " * pad
    assert filters._ngram_reason(words, Counter(words), len(text), CFG) == _ref_ngram_reason(words, len(text), CFG)


@given(st.lists(st.sampled_from(PROSE.split()[:30]), min_size=5, max_size=400), st.floats(0.0, 0.3))
@settings(max_examples=300, deadline=None)
def test_ngram_checks_match_datatrove_real_words(words, frac):
    cfg = dataclasses.replace(CFG, **{name: frac for name in OFF})
    text = " ".join(words)
    assert filters._ngram_reason(words, Counter(words), len(text), cfg) == _ref_ngram_reason(words, len(text), cfg)


@given(st.text(alphabet=st.characters(exclude_categories=("Cs",)), max_size=400))
@settings(max_examples=300, deadline=None)
def test_quality_reason_total_on_arbitrary_unicode(text):
    assert quality_reason(text, CFG) in REASONS + (None,)
    loose = QualityConfig(
        min_words=0,
        min_stop_words=0,
        min_mean_word_length=0.0,
        min_alpha_words_frac=0.0,
        min_word_entropy=0.0,
        max_non_alpha_char_frac=1.0,
        max_symbol_word_ratio=1e9,
        unique_words_min_words=0,
    )
    assert quality_reason(text, loose) in REASONS + (None,)


@given(st.lists(st.sampled_from(PROSE.split() + ["#", "...", "-", "\n", "\n\n", "•"]), max_size=500))
@settings(max_examples=300, deadline=None)
def test_quality_reason_total_on_word_soup(tokens):
    text = normalize_text(" ".join(tokens))
    assert quality_reason(text, CFG) in REASONS + (None,)


def test_entropy_matches_definition():
    words = ["the", "cat", "of", "house", "dog", "and"] * 12
    h = -sum(c / len(words) * math.log2(c / len(words)) for c in Counter(words).values())
    cfg = dataclasses.replace(CFG, min_word_entropy=h + 1e-9)
    assert quality_reason(" ".join(words), cfg) == "low_word_entropy"
    assert quality_reason(" ".join(words), dataclasses.replace(cfg, min_word_entropy=h - 1e-9, **OFF)) is None
