import re
import unicodedata

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipelines.normalize import content_hash, exact_dedup_key, normalize_text

# Characters that interact: line breaks of every kind, odd spaces, controls, invisible
# format characters, combining marks (NFC), and surrogates.
TRICKY = list("ab e\t\n\r") + [
    "\r\n",
    "\x00",
    "\x07",
    "\x0b",
    "\x0c",
    "\x1c",
    "\x1f",
    "\x7f",
    "\x85",
    "\x9f",
    "\u00a0",
    "\u00ad",
    "\u0301",
    "\u0308",
    "\u200b",
    "\u200d",
    "\u2009",
    "\u2028",
    "\u2029",
    "\u3000",
    "\ufeff",
    "\ud800",
    "\udfff",
    "\u212b",
    "\u2000",
    "\U0001f600",
]
tricky_text = st.lists(st.sampled_from(TRICKY), max_size=60).map("".join)
any_text = st.text(alphabet=st.characters(exclude_categories=()), max_size=200)  # surrogates too


@pytest.mark.parametrize(
    "raw, expected",
    [
        ("a\r\nb\rc\nd", "a\nb\nc\nd"),
        ("a\x0bb\x0cc\x85d\u2028e", "a\nb\nc\nd\ne"),
        ("para one\u2029para two", "para one\n\npara two"),
        ("a\u00a0b\u2009c\u3000d", "a b c d"),
        ("col1\tcol2", "col1\tcol2"),  # tabs are kept inside lines
        ("line \t \nnext  ", "line\nnext"),  # trailing spaces and tabs stripped
        ("a\n\n\n\n\nb", "a\n\nb"),
        ("a\n \n\t\n \nb", "a\n\nb"),  # whitespace-only lines count as blank
        ("\n\n  hello  \n\n", "hello"),
        ("  indented\n    more", "indented\n    more"),  # inner indentation is kept
        ("nul\x00bell\x07del\x7f", "nulbelldel"),
        ("soft\u00adhyphen zero\u200bwidth \ufeffbom", "softhyphen zerowidth bom"),
        ("emoji\u200dzwj", "emoji\u200dzwj"),
        ("cafe\u0301", "caf\u00e9"),  # NFC
        ("e\x00\u0301", "\u00e9"),  # control removed before NFC, so idempotent
        ("bad\ud800surrogate", "bad\ufffdsurrogate"),
        ("", ""),
        (" \n\t ", ""),
    ],
)
def test_normalize_examples(raw, expected):
    assert normalize_text(raw) == expected


def test_normalize_keeps_real_text():
    text = "A compiler converts another program\nfrom a {source language} to machine code.\n\n(1994-11-07)"
    assert normalize_text(text) == text


@given(tricky_text)
@settings(max_examples=500, deadline=None)
def test_normalize_idempotent_tricky(text):
    once = normalize_text(text)
    assert normalize_text(once) == once


@given(any_text)
@settings(max_examples=500, deadline=None)
def test_normalize_idempotent_and_clean(text):
    out = normalize_text(text)
    assert normalize_text(out) == out
    assert unicodedata.is_normalized("NFC", out)
    assert out == out.strip()
    assert "\r" not in out and "\n\n\n" not in out
    assert not re.search("[ \t]\n", out)
    assert not re.search("[\x00-\x08\x0b-\x1f\x7f-\x9f\ud800-\udfff]", out)
    out.encode("utf-8")  # always encodable


@given(any_text)
@settings(deadline=None)
def test_hashes_never_crash(text):
    h = content_hash(text)
    assert re.fullmatch("[0-9a-f]{32}", h)
    k = exact_dedup_key(text)
    assert -(2**63) <= k < 2**63


def test_content_hash_is_blake2b_128_of_utf8():
    import hashlib

    assert content_hash("héllo") == hashlib.blake2b("héllo".encode(), digest_size=16).hexdigest()
    assert content_hash("a") != content_hash("b")
    assert content_hash("a") == content_hash("a")


def test_exact_dedup_key_ignores_case_and_spacing():
    k = exact_dedup_key("Hello  World\n\n  from FOLDOC")
    assert k == exact_dedup_key("hello world from foldoc")
    assert k == exact_dedup_key("HELLO\tWORLD FROM\nFOLDOC ")
    assert k != exact_dedup_key("hello world from foldoc!")
    assert k != exact_dedup_key("hello worldfrom foldoc")


def test_exact_dedup_key_unicode_forms():
    assert exact_dedup_key("Cafe\u0301 STRASSE") == exact_dedup_key("café straße")


@given(st.text(alphabet=st.characters(max_codepoint=127), max_size=100))
@settings(deadline=None)
def test_exact_dedup_key_case_and_whitespace_properties(text):
    assert exact_dedup_key(text) == exact_dedup_key(text.upper())
    assert exact_dedup_key(text) == exact_dedup_key("  " + "\n".join(text.split()) + "\t")


@given(any_text)
@settings(deadline=None)
def test_dedup_key_stable_under_normalization_of_spacing(text):
    # Normalization only changes what the loose form ignores, controls and format chars aside.
    if not re.search("[\x00-\x08\x0e-\x1b\x7f-\x9f\u00ad\u200b\u2060\ufeff\ud800-\udfff]", text):
        assert exact_dedup_key(normalize_text(text)) == exact_dedup_key(text)
