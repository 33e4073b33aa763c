"""MinHash signatures and band keys: exactness against a slow reference, determinism, and
statistical behaviour on real FOLDOC text (tests/pipelines/fixtures/foldoc_excerpts.txt)."""

from __future__ import annotations

import random
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import pipelines.minhash as mh
from pipelines.minhash import MinHashConfig, band_keys, signatures

FIXTURE = Path(__file__).parent / "fixtures" / "foldoc_excerpts.txt"
M64 = (1 << 64) - 1


def load_excerpts() -> dict[str, str]:
    """Title -> text (paragraphs joined by a blank line) of each FOLDOC excerpt."""
    entries: dict[str, str] = {}
    for block in FIXTURE.read_text(encoding="utf-8").split("\n## ")[1:]:
        title, body = block.split("\n", 1)
        entries[title] = "\n\n".join(p for p in body.strip().split("\n") if p)
    return entries


EXCERPTS = load_excerpts()
LONG = [t for t in EXCERPTS.values() if len(t.split()) >= 300]


# --- slow reference of the documented algorithm, in plain Python integers -------------------


def ref_words(text: str) -> list[bytes]:
    data = text.lower().encode("utf-8", "surrogatepass")
    word = bytearray(len(data))
    for i, b in enumerate(data):
        word[i] = (b >= 0x80) or chr(b) in "abcdefghijklmnopqrstuvwxyz0123456789_"
    for i in range(len(data) - 1):  # U+2000..U+203F (E2 80 xx) and U+00A0 (C2 A0) separate
        if data[i] == 0xE2 and data[i + 1] == 0x80:
            word[i : i + 3] = b"\0\0\0"[: len(data) - i]
        if data[i] == 0xC2 and data[i + 1] == 0xA0:
            word[i : i + 2] = b"\0\0"
    words, cur = [], bytearray()
    for b, w in zip(data, word):
        if w:
            cur.append(b)
        elif cur:
            words.append(bytes(cur))
            cur = bytearray()
    if cur:
        words.append(bytes(cur))
    return [w[i : i + mh._MAX_WORD] for w in words for i in range(0, len(w), mh._MAX_WORD)]


def ref_word_hash(word: bytes) -> int:
    h = sum(b * pow(mh._POLY, k, 1 << 64) for k, b in enumerate(word))
    return mh._mix64_int(h + len(word))


def ref_shingles(words: list, n: int) -> list[tuple]:
    if len(words) < n:
        return [tuple(words)]
    return [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]


def ref_signature(text: str, cfg: MinHashConfig) -> list[int]:
    coef = [int(c) for c in mh._constants(cfg.seed, 1, cfg.ngram + 1)]
    mult = [int(c) | 1 for c in mh._constants(cfg.seed, 2, cfg.num_perm)]
    add = [int(c) for c in mh._constants(cfg.seed, 3, cfg.num_perm)]
    hashes = []
    for sh in ref_shingles([ref_word_hash(w) for w in ref_words(text)], cfg.ngram):
        acc = len(sh) * coef[cfg.ngram] + sum(h * coef[k] for k, h in enumerate(sh))
        hashes.append(mh._mix64_int(acc))
    return [min((a * x + b) & M64 for x in hashes) for a, b in zip(mult, add)]


def true_jaccard(a: str, b: str, n: int = 5) -> float:
    # for ASCII text this is the module's word definition
    sa = set(ref_shingles(re.findall(r"[a-z0-9_]+", a.lower()), n))
    sb = set(ref_shingles(re.findall(r"[a-z0-9_]+", b.lower()), n))
    return len(sa & sb) / len(sa | sb)


# --- config ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "field,value,exc,message",
    [
        ("ngram", 0, ValueError, "ngram: expected a value >= 1, got 0"),
        ("ngram", 65, ValueError, "ngram: expected a value <= 64, got 65"),
        ("bands", 0, ValueError, "bands: expected a value >= 1, got 0"),
        ("rows", -1, ValueError, "rows: expected a value >= 1, got -1"),
        ("seed", -1, ValueError, "seed: expected a value >= 0, got -1"),
        ("bands", True, TypeError, "bands: expected an integer, got True (bool)"),
        ("rows", 2.0, TypeError, "rows: expected an integer, got 2.0 (float)"),
        ("ngram", "5", TypeError, "ngram: expected an integer, got '5' (str)"),
    ],
)
def test_config_rejects_bad_values_naming_the_field(field, value, exc, message):
    # ranges: the field metadata, checked by model.checked (the same wording for every config)
    with pytest.raises(exc) as e:
        MinHashConfig(**{field: value})
    assert str(e.value).startswith(message)


def test_config_defaults_and_product_limit():
    cfg = MinHashConfig()
    assert (cfg.ngram, cfg.bands, cfg.rows, cfg.seed, cfg.num_perm) == (5, 14, 8, 1, 112)
    assert 0.6 < cfg.approx_threshold < 0.8
    with pytest.raises(ValueError, match=r"^rows: expected bands \* rows <= 4096 \(bands=100\), got 100$"):
        MinHashConfig(bands=100, rows=100)


# --- exactness and determinism ----------------------------------------------------------------

ALPHABET = "ab cD.,-_'\n\té\u00a0\u2014\u201c\u201d\u00df9\U0001f600"


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.text(alphabet=ALPHABET, max_size=60), min_size=1, max_size=6),
    st.integers(1, 4),
    st.integers(1, 3),
    st.integers(0, 50),
)
def test_signatures_equal_slow_reference(texts, ngram, rows, seed):
    cfg = MinHashConfig(ngram=ngram, bands=3, rows=rows, seed=seed)
    sigs = signatures(texts, cfg)
    assert sigs.dtype == np.uint64 and sigs.shape == (len(texts), cfg.num_perm)
    for text, sig in zip(texts, sigs):
        assert sig.tolist() == ref_signature(text, cfg)


@settings(max_examples=30, deadline=None)
@given(st.lists(st.text(alphabet=ALPHABET, max_size=300), min_size=1, max_size=8))
def test_batching_and_block_sizes_do_not_change_signatures(texts):
    cfg = MinHashConfig(ngram=2, bands=2, rows=2)
    whole = signatures(texts, cfg)
    alone = np.vstack([signatures([t], cfg) for t in texts])
    old = mh._SLICE_BYTES, mh._BLOCK_SHINGLES
    try:  # tiny slices and blocks: words and documents straddle block edges
        mh._SLICE_BYTES, mh._BLOCK_SHINGLES = 300, 3
        tiny = signatures(texts, cfg)
    finally:
        mh._SLICE_BYTES, mh._BLOCK_SHINGLES = old
    assert np.array_equal(whole, alone) and np.array_equal(whole, tiny)


def test_long_runs_are_cut_and_match_reference():
    cfg = MinHashConfig(ngram=2, bands=2, rows=2)
    text = "x" * (3 * mh._MAX_WORD + 7) + " tail"
    assert signatures([text], cfg)[0].tolist() == ref_signature(text, cfg)


def test_empty_inputs():
    cfg = MinHashConfig()
    assert signatures([], cfg).shape == (0, 112)
    sigs = signatures(["", "  ...  ", "\u2014"], cfg)  # no words: all equal
    assert (sigs == sigs[0]).all()


def test_case_and_punctuation_do_not_matter():
    a = "Cache-line, (CACHE line) \u201cwrite\u2014back\u201d caches."
    b = "cache line cache line write back caches"
    assert np.array_equal(signatures([a]), signatures([b]))
    assert not np.array_equal(signatures([a]), signatures([b + " x"]))


def test_identical_texts_identical_signatures_and_keys():
    texts = list(EXCERPTS.values())
    sigs = signatures(texts + texts[::-1])
    assert np.array_equal(sigs[: len(texts)], sigs[len(texts) :][::-1])
    keys = band_keys(sigs)
    assert np.array_equal(keys[: len(texts)], keys[len(texts) :][::-1])


def test_signatures_same_in_another_process_with_another_hash_seed():
    text = LONG[0]
    code = (
        "import sys; from pipelines.minhash import signatures, band_keys; "
        "t = sys.stdin.read(); print(band_keys(signatures([t]))[0].tolist())"
    )
    root = Path(__file__).resolve().parents[2]
    out = subprocess.run(
        [sys.executable, "-c", code],
        input=text,
        capture_output=True,
        text=True,
        cwd=root,
        env={"PYTHONHASHSEED": "12345", "PATH": ""},
        check=True,
    ).stdout
    assert out.strip() == str(band_keys(signatures([text]))[0].tolist())


# --- LSH behaviour on real text ---------------------------------------------------------------


def shares_band(a: np.ndarray, b: np.ndarray) -> bool:
    return bool((a == b).any())


def test_one_word_change_collides_in_a_band():
    # J ~ 0.97 for one changed word in 300: P(no shared band) = (1 - J**8)**14 ~ 1e-9
    rng = random.Random(0)
    cfg = MinHashConfig()
    assert len(LONG) >= 5
    for text in LONG:
        words = text.split(" ")
        variants = []
        for _ in range(10):
            w = list(words)
            w[rng.randrange(len(w))] = "replacement"
            variants.append(" ".join(w))
        keys = band_keys(signatures([text] + variants, cfg), cfg)
        for k in keys[1:]:
            assert shares_band(keys[0], k)


def test_unrelated_texts_share_no_band():
    cfg = MinHashConfig()
    texts = list(EXCERPTS.values())
    keys = band_keys(signatures(texts, cfg), cfg)
    for i in range(len(texts)):
        for j in range(i + 1, len(texts)):
            assert not shares_band(keys[i], keys[j])


def test_estimated_jaccard_close_to_true_jaccard():
    cfg = MinHashConfig(bands=32, rows=8)  # 256 permutations: sd of the estimate <= 0.032
    pairs = []
    for text in LONG:
        paras = text.split("\n\n")
        if len(paras) >= 4:
            pairs.append(("\n\n".join(paras[:-1]), "\n\n".join(paras[1:])))  # overlapping
        words = text.split(" ")
        pairs.append((" ".join(words[: 2 * len(words) // 3]), " ".join(words[len(words) // 3 :])))
    assert len(pairs) >= 8
    truths, estimates = [], []
    for a, b in pairs:
        sig = signatures([a, b], cfg)
        truths.append(true_jaccard(a, b))
        estimates.append(float((sig[0] == sig[1]).mean()))
    truths, estimates = np.array(truths), np.array(estimates)
    assert truths.min() > 0.05 and truths.max() < 0.95  # pairs are genuinely partial overlaps
    assert np.abs(estimates - truths).max() < 0.13  # 4 sd
    assert abs((estimates - truths).mean()) < 0.05  # no bias


# --- band keys --------------------------------------------------------------------------------


def test_band_keys_shape_and_band_separation():
    cfg = MinHashConfig(bands=14, rows=8)
    sigs = np.zeros((3, 112), dtype=np.uint64)  # identical rows in every band
    keys = band_keys(sigs, cfg)
    assert keys.dtype == np.int64 and keys.shape == (3, 14)
    assert len(set(keys[0].tolist())) == 14
    assert (keys == keys[0]).all()
    assert ((keys[0].view(np.uint64) & np.uint64(15)) == np.arange(14)).all()


def test_band_keys_depend_on_every_row():
    cfg = MinHashConfig(bands=2, rows=3)
    sigs = np.arange(6, dtype=np.uint64).reshape(1, 6).repeat(7, axis=0)
    for i in range(6):
        sigs[i + 1, i] += np.uint64(1)
    keys = band_keys(sigs, cfg)
    changed = keys[1:] != keys[0]
    assert changed.sum(axis=1).tolist() == [1] * 6
    assert changed[:, 0].tolist() == [True] * 3 + [False] * 3


def test_band_keys_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match="bands=14, rows=8"):
        band_keys(np.zeros((2, 100), dtype=np.uint64), MinHashConfig())
