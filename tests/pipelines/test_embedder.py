"""The retrieval embedder on real FOLDOC text: loads offline from the bundled package, unit-norm
float32 vectors, deterministic, and good enough that a paraphrase finds its entry."""

from __future__ import annotations

import os
import socket

import numpy as np
import pytest

from pipelines.embedder import Embedder, EmbedderError, bundled_minilm_dir, fingerprint_dir, load_embedder, resolve_spec
from tests.conftest import foldoc_records

# (FOLDOC id, a paraphrase that shares few words with the entry's text)
PARAPHRASES = [
    ("foldoc:53", "the Unix device file that throws away everything written to it"),
    ("foldoc:44", "script that runs when somebody signs on to a Unix account"),
    ("foldoc:59", "Ethernet over thin coax cable"),
    ("foldoc:65", "serial port chip with a sixteen byte buffer"),
    ("foldoc:73", "which address to type in the browser to configure a home router"),
    ("foldoc:87", "slang for an ignorant person, taken from the page not found error"),
    ("foldoc:12", "plain text version of the copyright sign"),
]


@pytest.fixture(scope="module")
def embedder() -> Embedder:
    # Nothing may download at run time: load with every outgoing connection refused, so a hub
    # request would fail the test instead of quietly succeeding on a machine with network.
    def refuse(self, address):
        raise OSError(f"test forbids network access (tried {address!r})")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(socket.socket, "connect", refuse)
        emb = load_embedder("minilm")
        emb.embed(["warm up under the same guard"])
    return emb


@pytest.fixture(scope="module")
def corpus() -> list[dict]:
    # a prefix of each entry, about the size of a reference (<= 128 tokens)
    return [{"id": r["id"], "text": r["text"][:500]} for r in foldoc_records(100, min_words=30)]


@pytest.fixture(scope="module")
def corpus_vectors(embedder, corpus) -> np.ndarray:
    return embedder.embed([r["text"] for r in corpus], batch_size=64)


def test_identity_and_offline_switches(embedder):
    assert embedder.name == "all-MiniLM-L6-v2"
    assert embedder.dim == 384
    assert len(embedder.fingerprint) == 32 and int(embedder.fingerprint, 16) >= 0
    assert embedder.id == f"all-MiniLM-L6-v2@{embedder.fingerprint[:16]}"
    assert os.environ["HF_HUB_OFFLINE"] == "1" and os.environ["TRANSFORMERS_OFFLINE"] == "1"
    lineage = embedder.lineage()
    assert lineage["embedder_fingerprint"] == embedder.fingerprint and lineage["similarity"] == "cosine"
    embedder.check_lineage(lineage)
    other = dict(lineage, embedder="bge-m3@0123456789abcdef", embedder_fingerprint="0123456789abcdef" * 2)
    with pytest.raises(EmbedderError, match="bge-m3@0123456789abcdef.*all-MiniLM-L6-v2@"):
        embedder.check_lineage(other)


def test_vectors_are_unit_norm_float32(embedder, corpus, corpus_vectors):
    vecs = corpus_vectors
    assert vecs.shape == (len(corpus), 384) and vecs.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vecs, axis=1), 1.0, atol=1e-5)
    assert embedder.embed([]).shape == (0, 384)


def test_deterministic_and_batch_independent(embedder, corpus, corpus_vectors):
    texts = [r["text"] for r in corpus[:12]]
    a = embedder.embed(texts, batch_size=4)
    assert np.array_equal(a, embedder.embed(texts, batch_size=4))
    # other batches pad to other lengths; the attention mask must keep padding out of the vector
    np.testing.assert_allclose(a, corpus_vectors[:12], atol=1e-5)


def test_paraphrase_retrieves_its_entry(embedder, corpus, corpus_vectors):
    ids = [r["id"] for r in corpus]
    assert all(pid in ids for pid, _ in PARAPHRASES), "fixture entries moved: pick new paraphrases"
    docs = corpus_vectors
    queries = embedder.embed([q for _, q in PARAPHRASES])
    sims = queries @ docs.T
    for (pid, query), row in zip(PARAPHRASES, sims):
        top5 = [ids[i] for i in np.argsort(-row)[:5]]
        assert pid in top5, f"{query!r} -> {top5}, expected {pid}"


def test_local_directory_spec_matches_default(embedder, corpus):
    # any local sentence-transformers directory is a spec; the bundled one is the same model
    other = load_embedder(str(bundled_minilm_dir()))
    assert other.fingerprint == embedder.fingerprint == fingerprint_dir(bundled_minilm_dir())
    texts = [r["text"] for r in corpus[:4]]
    np.testing.assert_allclose(other.embed(texts), embedder.embed(texts), atol=1e-6)


def test_fingerprint_follows_the_files(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "README.md").write_text("model card")
    before = fingerprint_dir(tmp_path)
    (tmp_path / "README.md").write_text("edited model card")  # cannot change a vector
    assert fingerprint_dir(tmp_path) == before
    (tmp_path / "config.json").write_text('{"hidden_size": 8}')
    assert fingerprint_dir(tmp_path) != before


def test_missing_path_names_it(tmp_path):
    missing = tmp_path / "no-such-model"
    with pytest.raises(EmbedderError, match="no-such-model"):
        load_embedder(str(missing))


def test_directory_that_is_not_a_model(tmp_path):
    (tmp_path / "notes.txt").write_text("not a model")
    with pytest.raises(EmbedderError, match="not a sentence-transformers model"):
        resolve_spec(str(tmp_path))
    # a config.json without weights gets past the check and fails in loading, naming the path
    (tmp_path / "config.json").write_text('{"model_type": "bert"}')
    with pytest.raises(EmbedderError, match=str(tmp_path.name)):
        load_embedder(str(tmp_path))


def test_rejects_non_strings(embedder):
    with pytest.raises(EmbedderError, match="item 1"):
        embedder.embed(["ok", None])
