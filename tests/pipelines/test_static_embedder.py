"""The static embedder distilled from the shipped MiniLM (`static-minilm`) on real FOLDOC text:
offline, unit-norm, deterministic, its own identity (never mixed with MiniLM's vectors), and good
enough that a reference's own text and a perturbed window of it find that reference.

The distilled table is built once per machine into the user cache (M3_CACHE_DIR overrides it):
the first run of this module pays the distillation (30,522 MiniLM forwards, ~1 min on 2 cores)."""

from __future__ import annotations

import json
import socket

import numpy as np
import pytest

from pipelines.embed_step import EMBEDDINGS_SCHEMA, EmbedRefs, to_arrow
from pipelines.embedder import Embedder, EmbedderError, bundled_minilm_dir, fingerprint_dir, load_embedder
from pipelines.static_embedder import (
    RECIPE,
    STATIC_SPEC,
    distill_table,
    is_static_dir,
    pca,
    sif_weights,
    static_dir,
    static_fingerprint,
)
from storage.bank import Bank
from tests.conftest import foldoc_records


@pytest.fixture(scope="module")
def static() -> Embedder:
    # nothing may download, neither while distilling (first use) nor while loading
    def refuse(self, address):
        raise OSError(f"test forbids network access (tried {address!r})")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(socket.socket, "connect", refuse)
        emb = load_embedder(STATIC_SPEC)
        emb.embed(["warm up under the same guard"])
    return emb


@pytest.fixture(scope="module")
def corpus() -> list[dict]:
    # a prefix of each entry, about the size of a reference (<= 128 tokens)
    return [{"id": r["id"], "text": r["text"][:500]} for r in foldoc_records(200, min_words=30)]


@pytest.fixture(scope="module")
def corpus_vectors(static, corpus) -> np.ndarray:
    return static.embed([r["text"] for r in corpus])


def minilm_lineage() -> dict:
    # what the embed stage records for MiniLM, without loading MiniLM (its fingerprint is the files')
    fp = fingerprint_dir(bundled_minilm_dir())
    return {"embedder": f"all-MiniLM-L6-v2@{fp[:16]}", "embedder_fingerprint": fp}


def test_identity_differs_from_minilm(static):
    source_fp = fingerprint_dir(bundled_minilm_dir())
    assert static.kind == "static" and static.dim == RECIPE["pca_dims"] == 256
    # a function of the source weights and the recipe, not of where the cache lives
    assert static.fingerprint == static_fingerprint(source_fp)
    assert static.fingerprint != source_fp
    assert static.id == f"static-MiniLM-L6-v2@{static.fingerprint[:16]}"
    assert static_fingerprint(source_fp, {**RECIPE, "pca_dims": 128}) != static.fingerprint
    lineage = static.lineage()
    assert lineage["static_source_fingerprint"] == source_fp and lineage["static_recipe"] == RECIPE
    assert lineage["static_files"] == fingerprint_dir(static.path) and lineage["embedder_kind"] == "static"
    json.dumps(lineage)  # goes into the table's schema metadata
    static.check_lineage(lineage)


def test_refuses_minilm_vectors_and_minilm_refuses_its(static, tmp_path):
    # a real embeddings table written with MiniLM's lineage, as the embed stage writes it
    bank = Bank(tmp_path / "bank")
    rows = {
        "ref_id": np.array(["r1"], dtype=object),
        "embedder": np.array([minilm_lineage()["embedder"]], dtype=object),
        "content_hash": np.array(["h1"], dtype=object),
        "vector": np.eye(1, 384, dtype=np.float32),
    }
    bank.write("embeddings", EMBEDDINGS_SCHEMA(384), [to_arrow(rows, 384)], {"embedder": minilm_lineage()})
    with pytest.raises(EmbedderError, match=r"all-MiniLM-L6-v2@.*static-MiniLM-L6-v2@"):
        static.check_lineage(bank.metadata("embeddings")["embedder"])
    # and the other way round, with MiniLM's own check (its fingerprint, the static lineage)
    minilm = Embedder(
        name="all-MiniLM-L6-v2",
        dim=384,
        fingerprint=minilm_lineage()["embedder_fingerprint"],
        path=str(bundled_minilm_dir()),
        max_seq_length=256,
    )
    with pytest.raises(EmbedderError, match="static-MiniLM-L6-v2@"):
        minilm.check_lineage(static.lineage())


def test_vectors_are_unit_norm_float32(static, corpus, corpus_vectors):
    assert corpus_vectors.shape == (len(corpus), 256) and corpus_vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(corpus_vectors, axis=1), 1.0, atol=1e-5)
    assert static.embed([]).shape == (0, 256)
    with pytest.raises(EmbedderError, match="item 1"):
        static.embed(["ok", 3])


def test_deterministic_batch_independent_and_reloadable(static, corpus, corpus_vectors):
    texts = [r["text"] for r in corpus[:20]]
    a = static.embed(texts, batch_size=4)
    np.testing.assert_array_equal(a, static.embed(texts, batch_size=4))
    np.testing.assert_allclose(a, corpus_vectors[:20], atol=1e-6)
    again = load_embedder(STATIC_SPEC)  # from the cache this time
    assert again.fingerprint == static.fingerprint and again.path == static.path
    np.testing.assert_allclose(again.embed(texts), a, atol=1e-6)


def test_distillation_is_reproducible():
    # the build itself, twice, on the first 600 word pieces (the whole vocabulary takes a minute)
    src = bundled_minilm_dir()
    a = distill_table(src, vocab_limit=600)
    b = distill_table(src, vocab_limit=600)
    assert a.shape == (600, 256) and a.dtype == np.float32
    np.testing.assert_allclose(a, b, atol=1e-6)


def test_pca_and_sif_weights():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(300, 6)) * np.array([5, 4, 3, 2, 1, 0.5])
    p = pca(x, 3)
    assert p.shape == (300, 3)
    np.testing.assert_allclose(p.mean(axis=0), 0, atol=1e-9)
    var = p.var(axis=0)
    assert var[0] > var[1] > var[2]
    # sign convention: the largest |score| of each axis is positive, whatever the input's sign
    assert np.all(p[np.argmax(np.abs(p), axis=0), range(3)] > 0)
    np.testing.assert_allclose(pca(-x, 3), p, atol=1e-9)
    w = sif_weights(1000, 1e-4)
    assert np.all(np.diff(w) > 0) and 0 < w[0] < w[-1] < 1  # frequent (low-rank) pieces weigh less


def test_own_text_is_its_nearest_neighbour(corpus, corpus_vectors):
    sims = corpus_vectors @ corpus_vectors.T
    texts = [r["text"] for r in corpus]
    for i, row in enumerate(sims):
        best = int(np.argmax(row))
        # a tie with an identical text would be as good; FOLDOC prefixes are distinct
        assert best == i or texts[best] == texts[i], (corpus[i]["id"], corpus[best]["id"])


def test_perturbed_window_finds_its_reference(static, corpus, corpus_vectors):
    # bench/retrieval.py's queries: 32 consecutive words, 20 % of them dropped
    rng = np.random.default_rng(0)
    queries = []
    for r in corpus:
        words = r["text"].split()
        start = int(rng.integers(0, max(1, len(words) - 31)))
        kept = [w for w in words[start : start + 32] if rng.random() >= 0.2]
        queries.append(" ".join(kept))
    top5 = np.argsort(-(static.embed(queries) @ corpus_vectors.T), axis=1)[:, :5]
    hit = np.mean([i in row for i, row in enumerate(top5)])
    assert hit >= 0.95, hit


def test_embed_step_writes_static_rows(static):
    step = EmbedRefs(STATIC_SPEC)
    out = step(
        {
            "ref_id": np.array(["a", "b"], dtype=object),
            "text": np.array(["a compiler", "the null device"], dtype=object),
            "content_hash": np.array(["h1", "h2"], dtype=object),
        }
    )
    batch = to_arrow(out, step.dim)
    assert batch.schema == EMBEDDINGS_SCHEMA(256)
    assert set(batch.column("embedder").to_pylist()) == {static.id}


def test_local_model2vec_directory_is_a_spec(static):
    # the cached directory is a standard model2vec model; given as a path, its identity is its bytes
    assert is_static_dir(static.path)
    other = load_embedder(static.path)
    assert other.kind == "static" and other.fingerprint == fingerprint_dir(static.path) != static.fingerprint
    np.testing.assert_allclose(other.embed(["a compiler"]), static.embed(["a compiler"]), atol=1e-6)


def test_corrupt_cache_is_named(tmp_path, monkeypatch):
    # a cache directory whose table is damaged: a clear error naming it, not a stack of numpy
    monkeypatch.setenv("M3_CACHE_DIR", str(tmp_path))
    path = static_dir(fingerprint_dir(bundled_minilm_dir()))
    path.mkdir(parents=True)
    (path / "model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(EmbedderError, match="delete the directory"):
        load_embedder(STATIC_SPEC)


def test_is_the_default(static):
    from jobs.config import RetrievalConfig, load_config

    assert load_embedder().id == load_embedder(None).id == static.id
    assert RetrievalConfig().embedder == STATIC_SPEC == load_config("configs/demo.yaml").retrieval.embedder
