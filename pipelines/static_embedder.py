"""A static embedding distilled from the shipped MiniLM: `retrieval.embedder: static-minilm`.

Why: MiniLM is the longest stage of the demo (18k references, minutes on 2 cores) and, at decode
time, one MiniLM call per swap point costs as much as the language model. A static model is a
table with one vector per word piece; a text's vector is the mean of its word pieces' rows, then
L2-normalized: a tokenizer call and a gather, hundreds of times faster (BENCHMARKS.md, "Choosing
the retriever").

How (the Model2Vec recipe, Tulkens & van Dongen 2024): every word piece of MiniLM's vocabulary is
run through MiniLM alone ([CLS] piece [SEP], mean of the 3 outputs), the 30,522 x 384 table is
reduced by PCA to `pca_dims` (which also centres it), and row i is scaled by the SIF weight
a / (a + p_i), p_i being a Zipf estimate of the piece's frequency from its rank. No data is read.

Why our own 40 lines of distillation and not `model2vec.distill`: the `model2vec[distill]` extra
pins transformers < 5.4 and tokenizers 0.22 (this project runs transformers 5.24) and pulls
skeletoken; the base `model2vec` package (numpy, tokenizers, safetensors, joblib: all already
here) is enough to store and run the result, and it is what we use for that, so the directory is
a standard model2vec model (`StaticModel.from_pretrained(dir)`, sentence-transformers'
`StaticEmbedding.from_model2vec`). We keep MiniLM's vocabulary and ids as they are (model2vec
drops the [unused] pieces and renumbers): the tokenizer file is MiniLM's own, unchanged.

Where: built at first use into a cache directory (`M3_CACHE_DIR`, else `$XDG_CACHE_HOME/memory3`,
else `~/.cache/memory3`), about 30-60 s on 2 cores, under a file lock so concurrent loaders build
it once; later loads take well under a second. Not shipped in the repository: float32 it is
31 MB (PCA 256), not "a few MB", and it is a pure function of weights every install already has.

Identity: the fingerprint is a hash of the source MiniLM's fingerprint and the recipe (not of the
built bytes), for the same reason MiniLM's is a hash of its weights and not of its outputs: two
machines build float-different tables from the same weights (BLAS paths), as they compute
float-different MiniLM vectors, and a bank embedded on one must stay queryable on the other. The
hash of the built files is recorded in the lineage for audit. Vectors of MiniLM and of the static
model never mix: their fingerprints differ, and `Embedder.check_lineage` refuses the other's table.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

STATIC_SPEC = "static-minilm"
STATIC_NAME = "static-MiniLM-L6-v2"
# Bump when the build below changes what it produces: the fingerprint (and the cache directory)
# follow it, so banks embedded by the old build are refused rather than queried with new vectors.
RECIPE = {
    "method": "model2vec-distillation",
    "recipe_version": 1,
    "pooling": "mean-of-[CLS]-piece-[SEP]",
    "pca_dims": 256,
    "sif_coefficient": 1e-4,
    "dtype": "float32",
    "max_length": 512,
}


def cache_root() -> Path:
    if os.environ.get("M3_CACHE_DIR"):
        return Path(os.environ["M3_CACHE_DIR"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base).expanduser() / "memory3"


def static_fingerprint(source_fingerprint: str, recipe: dict = RECIPE) -> str:
    h = hashlib.blake2b(digest_size=16)
    h.update(json.dumps({"source": source_fingerprint, **recipe}, sort_keys=True).encode())
    return h.hexdigest()


def static_dir(source_fingerprint: str, recipe: dict = RECIPE) -> Path:
    return cache_root() / "embedders" / f"{STATIC_SPEC}-{static_fingerprint(source_fingerprint, recipe)[:16]}"


def ensure_static(source_dir: Path, source_fingerprint: str, recipe: dict = RECIPE, note=print) -> Path:
    """The static model's directory, built from `source_dir` if the cache does not hold it yet."""
    out = static_dir(source_fingerprint, recipe)
    if (out / "model.safetensors").is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.parent / f".{out.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # a second loader waits here, then finds the directory
        if (out / "model.safetensors").is_file():
            return out
        note(f"embedder {STATIC_SPEC}: distilling {source_dir.name} into {out} (once per machine)")
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
        try:
            build_static(source_dir, tmp, recipe)
            os.replace(tmp, out)  # whole or absent: a killed build leaves only a temp directory
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return out


def distill_table(
    source_dir: Path, recipe: dict = RECIPE, batch_size: int = 512, vocab_limit: int | None = None
) -> np.ndarray:
    """(vocab, pca_dims) float32: the static table, row i for word piece id i (the first
    vocab_limit pieces only, for tests: the whole vocabulary is 30,522 forward passes)."""
    import torch
    from transformers import AutoModel, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(source_dir), local_files_only=True)
    model = AutoModel.from_pretrained(str(source_dir), local_files_only=True).eval()
    n = min(len(tok.get_vocab()), vocab_limit or len(tok.get_vocab()))
    cls, sep = tok.cls_token_id, tok.sep_token_id
    rows = []
    with torch.inference_mode():
        for lo in range(0, n, batch_size):
            ids = torch.arange(lo, min(n, lo + batch_size))
            batch = torch.stack([torch.full_like(ids, cls), ids, torch.full_like(ids, sep)], dim=1)
            out = model(
                input_ids=batch, attention_mask=torch.ones_like(batch), token_type_ids=torch.zeros_like(batch)
            ).last_hidden_state
            rows.append(out.float().mean(dim=1).numpy())  # every sequence has 3 tokens: no padding
    table = np.nan_to_num(np.concatenate(rows).astype(np.float64))
    table = pca(table, int(recipe["pca_dims"]))
    table *= sif_weights(len(table), float(recipe["sif_coefficient"]))[:, None]
    return table.astype(np.float32)


def pca(x: np.ndarray, dims: int) -> np.ndarray:
    """Centred projection on the top `dims` principal axes; each axis's sign fixed so its largest
    |score| is positive (eigh returns either sign), which makes the result reproducible."""
    xc = x - x.mean(axis=0)
    vals, vecs = np.linalg.eigh(xc.T @ xc / max(len(x) - 1, 1))
    vecs = vecs[:, np.argsort(vals)[::-1][:dims]]
    scores = xc @ vecs
    signs = np.sign(scores[np.argmax(np.abs(scores), axis=0), np.arange(scores.shape[1])])
    return scores * np.where(signs == 0, 1, signs)


def sif_weights(n: int, a: float) -> np.ndarray:
    """a / (a + p_i), p_i Zipf's estimate of the frequency of the piece of rank i (its id)."""
    inv_rank = 1.0 / np.arange(2, n + 2)
    return a / (a + inv_rank / inv_rank.sum())


def build_static(source_dir: Path, out_dir: Path, recipe: dict = RECIPE) -> None:
    from model2vec import StaticModel
    from tokenizers import Tokenizer

    table = distill_table(source_dir, recipe)
    tokenizer = Tokenizer.from_file(str(source_dir / "tokenizer.json"))
    config = {
        "model_type": "model2vec",
        "architectures": ["StaticModel"],
        "tokenizer_name": source_dir.name,
        "apply_pca": recipe["pca_dims"],
        "sif_coefficient": recipe["sif_coefficient"],
        "hidden_dim": int(table.shape[1]),
        "seq_length": 1000000,
        "normalize": True,
        "pooling": "mean",
        "m3_recipe": recipe,
    }
    model = StaticModel(
        vectors=table,
        tokenizer=tokenizer,
        config=config,
        normalize=True,
        base_model_name=source_dir.name,
        max_length=int(recipe["max_length"]),
    )
    model.save_pretrained(str(out_dir))


def load_static(path: Path):
    """A model2vec StaticModel from a local directory (never the hub: the path must exist)."""
    from model2vec import StaticModel

    if not (Path(path) / "model.safetensors").is_file():
        raise FileNotFoundError(f"{str(path)!r} holds no model.safetensors: not a model2vec model directory")
    return StaticModel.from_pretrained(str(path))


def is_static_dir(path: Path) -> bool:
    """A local model2vec directory (config.json says model_type model2vec)."""
    try:
        return json.loads((Path(path) / "config.json").read_text()).get("model_type") == "model2vec"
    except (OSError, ValueError):
        return False
