"""The vector-quantizer codec [paper §3.3, App. B]: a trained FAISS index coding every head_dim
vector, the paper's `OPQ20x80-Residual2x14-PQ8x10` (14 B per 80-dim vector) or the same
structure scaled to another head_dim (`default_spec`). Part of model.codecs: import it there."""

from __future__ import annotations

import hashlib
import math
import os
import re
from pathlib import Path
from typing import Any, Sequence

import faiss
import numpy as np
import torch
from torch import Tensor

from model.codec_base import Codec, CodecError, _check_shape


def faiss_spec(spec: str) -> str:
    """The paper writes `OPQ20x80-Residual2x14-PQ8x10`; faiss.index_factory spells the same
    index `OPQ20_80,Residual2x14,PQ8x10`. Faiss spellings pass through unchanged."""
    if "," in spec or "-" not in spec:
        return spec
    return ",".join(re.sub(r"^OPQ(\d+)x(\d+)$", r"OPQ\1_\2", p) for p in spec.split("-"))


def default_spec(d: int) -> str:
    """The paper's structure for head_dim d at the paper's 1.4 bits per dim (112 / 80), so the
    ratio to bf16 stays ~11.4x for any d:
    - OPQ{d/4}x{d}: rotation learned for 4-dim blocks as 20 = 80/4 (d/2 blocks if 4 does not
      divide d);
    - Residual2x{b}: 2-way multi-index coarse stage, 0.35 bits per dim (28 / 80): b =
      round(0.175 d) bits per half, clamped to [1, 14] (2^b centroids need 2^b training vectors);
    - PQ{m}x{d/m}: 1 bit per dim, m the smallest divisor of d giving <= 10 bits per sub-quantizer.
    d=80: the paper's spec, 14 B; d=64: OPQ16x64-Residual2x11-PQ8x8, 11 B; d=32:
    OPQ8x32-Residual2x6-PQ4x8, 6 B; d=8: OPQ2x8-Residual2x1-PQ1x8, 2 B.
    """
    if d < 2 or d % 2:
        raise CodecError(f"VQ needs an even head_dim (the multi-index halves it), got {d}")
    m_opq = d // 4 if d % 4 == 0 else d // 2
    b = min(14, max(1, round(0.175 * d)))
    m = next(m for m in range(1, d + 1) if d % m == 0 and d // m <= 10)
    return f"OPQ{m_opq}x{d}-Residual2x{b}-PQ{m}x{d // m}"


def _parts(index: faiss.Index) -> list:
    """The index's trainable pieces, downcast: transforms (OPQ), the codec index, its coarse
    quantizer."""
    index, out = faiss.downcast_index(index), []
    if isinstance(index, faiss.IndexPreTransform):
        chain = index.chain
        out += [faiss.downcast_VectorTransform(chain.at(i)) for i in range(chain.size())]
        index = faiss.downcast_index(index.index)
    out.append(index)
    if isinstance(index, faiss.Index2Layer):
        out.append(faiss.downcast_index(index.q1.quantizer))
    return out


def min_train_vectors(spec: str, d: int) -> int:
    """Fewest training vectors faiss accepts for `spec` (k-means needs at least k points):
    2^14 = 16384 for the paper's spec. Faiss warns (on stderr) below 39 points per centroid,
    and quality on unseen vectors suffers below that, but it trains."""
    index = faiss.index_factory(d, faiss_spec(spec))
    need = 1
    for part in _parts(index):
        if isinstance(part, faiss.OPQMatrix):
            need = max(need, 256)  # its inner PQ has 8-bit sub-quantizers
        pq = getattr(part, "pq", None)
        if isinstance(pq, faiss.ProductQuantizer):
            need = max(need, 1 << pq.nbits)
    return need


class VQCodec(Codec):
    """Every head_dim vector of a memory coded by one trained FAISS quantizer (sa_encode /
    sa_decode), `code_size` bytes per vector: 14 for the paper's spec and d = 80. Lossy for
    every vector, zero ones too: empty slots of a short reference decode to small non-zero
    vectors, harmless because the memory's positions / mask exclude them from attention.

    Build with `VQCodec.train(...)`, `.load(path)` or `.from_bytes(data)` (spec is then None);
    `VQCodec()` has no quantizer and refuses to code. `quantizer_hash` is the sha256 of the
    serialized index, i.e. of the file `save` writes.
    """

    name = "vq"

    def __init__(self, index: faiss.Index | None = None, spec: str | None = None, serialized: bytes | None = None):
        self.index, self.spec = index, spec
        if index is not None and serialized is None:
            serialized = faiss.serialize_index(index).tobytes()
        self._bytes = serialized
        self.quantizer_hash = hashlib.sha256(serialized).hexdigest() if serialized else None

    @classmethod
    def train(
        cls,
        vectors: np.ndarray | Tensor,
        spec: str | None = None,
        seed: int = 0,
        *,
        max_train: int | None = None,
        niter: int | None = None,
    ) -> "VQCodec":
        """Train on vectors (n, d); a tensor of memories (..., d) is flattened to vectors.

        seed picks the sub-sample (max_train) and the vector order that k-means starts from,
        and seeds faiss's k-means: the same data, spec and seed give the same quantizer, byte
        for byte. niter caps every iteration count (OPQ rounds, k-means iterations) for quick
        training in tests and benchmarks; None keeps faiss's defaults.
        """
        if isinstance(vectors, Tensor):
            vectors = vectors.detach().cpu().to(torch.float32).numpy()
        x = np.asarray(vectors, np.float32)
        x = x.reshape(-1, x.shape[-1]) if x.ndim else x.reshape(0, 1)
        n, d = x.shape
        spec = spec or default_spec(d)
        try:
            index = faiss.index_factory(d, faiss_spec(spec))
        except RuntimeError as e:
            raise CodecError(f"vq: faiss cannot build {spec!r} for d={d}: {e}") from None
        need = min_train_vectors(spec, d)
        if n < need:
            raise CodecError(f"vq: {spec} needs at least {need} training vectors, got {n}")
        if not np.isfinite(x).all():
            raise CodecError("vq: training vectors hold NaN or inf")
        rng = np.random.default_rng(seed)
        pick = rng.permutation(n)[: max_train or n]
        x = np.ascontiguousarray(x[pick])
        for part in _parts(index):
            if isinstance(part, faiss.OPQMatrix) and niter is not None:
                part.niter, part.niter_pq_0 = min(part.niter, niter), min(part.niter_pq_0, niter)
            pq = getattr(part, "pq", None)
            if isinstance(pq, faiss.ProductQuantizer):
                pq.cp.seed = seed
                if niter is not None:
                    pq.cp.niter = min(pq.cp.niter, niter)
        try:
            index.train(x)
        except RuntimeError as e:
            raise CodecError(f"vq: training {spec} on {len(x)} vectors failed: {e}") from None
        return cls(index, spec)

    @classmethod
    def from_bytes(cls, data: bytes, expected_hash: str | None = None) -> "VQCodec":
        actual = hashlib.sha256(data).hexdigest()
        if expected_hash is not None and actual != expected_hash:
            raise CodecError(f"vq: quantizer mismatch: expected quantizer {expected_hash}, got {actual}")
        try:
            index = faiss.deserialize_index(np.frombuffer(data, dtype=np.uint8).copy())
        except RuntimeError as e:
            raise CodecError(f"vq: quantizer {actual} is not a readable faiss index: {e}") from None
        if not index.is_trained:
            raise CodecError(f"vq: quantizer {actual} is not trained")
        return cls(index, serialized=bytes(data))

    @classmethod
    def load(cls, path: str | os.PathLike, expected_hash: str | None = None) -> "VQCodec":
        from upath import UPath  # a local path or a bank URI

        try:
            data = UPath(str(path)).read_bytes()
        except FileNotFoundError:
            want = f" (the payloads need quantizer {expected_hash})" if expected_hash else ""
            raise CodecError(f"vq: quantizer file {path} is missing{want}") from None
        return cls.from_bytes(data, expected_hash)

    def to_bytes(self) -> bytes:
        self._require()
        return self._bytes

    def save(self, path: str | os.PathLike) -> str:
        """Write the serialized index (atomically) and return its hash."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_bytes(self.to_bytes())
        os.replace(tmp, path)
        return self.quantizer_hash

    @property
    def d(self) -> int:
        return self._require().d

    @property
    def code_size(self) -> int:
        return self._require().sa_code_size()

    def describe(self) -> dict[str, Any]:
        return {"codec": self.name, "spec": self.spec, "quantizer_hash": self.quantizer_hash}

    def nbytes(self, shape: Sequence[int]) -> int:
        shape = _check_shape(shape)
        self._check_dim(shape[-1])
        return math.prod(shape[:-1]) * self.code_size

    def _require(self, expected_hash: str | None = None) -> faiss.Index:
        if self.index is None:
            want = f", but the payloads were encoded with quantizer {expected_hash}" if expected_hash else ""
            raise CodecError(f"vq: no quantizer loaded{want}: load the quantizer stored with the bank")
        return self.index

    def _check_dim(self, d: int) -> None:
        if d != self.d:
            raise CodecError(f"vq: quantizer {self.quantizer_hash} codes {self.d}-dim vectors, memory has head_dim {d}")

    def _check_quantizer(self, quantizer_hash: str | None) -> None:
        self._require(quantizer_hash)
        if quantizer_hash is not None and quantizer_hash != self.quantizer_hash:
            raise CodecError(
                f"vq: quantizer mismatch: the payload was encoded with quantizer "
                f"{quantizer_hash}, the loaded quantizer is {self.quantizer_hash}"
            )

    def _encode(self, x: Tensor) -> np.ndarray:
        index = self._require()
        self._check_dim(x.shape[-1])
        v = x.to(torch.float32).contiguous().numpy().reshape(-1, x.shape[-1])
        if not np.isfinite(v).all():
            raise CodecError("vq: memory holds NaN or inf")
        return index.sa_encode(v).reshape(len(x), -1)

    def _decode(self, buf: np.ndarray, shape: tuple[int, ...]) -> Tensor:
        """Codes -> vectors, each computed the same way whatever else is in the batch.

        faiss's own sa_decode undoes the OPQ rotation with one BLAS matrix product over the
        batch, whose rounding depends on the batch size and on the CPU's kernels (a vector came
        back different alone and in a batch on AMD EPYC). The stages before the rotation are
        table lookups and additions (exact per vector); the rotation is undone here with a
        fixed summation order per output element, in float32 like faiss."""
        codes = buf.reshape(-1, self.code_size)
        index = faiss.downcast_index(self.index)
        if not isinstance(index, faiss.IndexPreTransform):
            return torch.from_numpy(index.sa_decode(codes))
        x = faiss.downcast_index(index.index).sa_decode(codes)
        for i in reversed(range(index.chain.size())):
            t = faiss.downcast_VectorTransform(index.chain.at(i))
            if not isinstance(t, faiss.LinearTransform) or not t.is_orthonormal:
                raise CodecError(f"vq: cannot decode through a {type(t).__name__} transform")
            x = _transpose_apply(
                x,
                faiss.vector_to_array(t.A).reshape(t.d_out, t.d_in),
                faiss.vector_to_array(t.b) if t.have_bias else None,
            )
        return torch.from_numpy(x)


def _transpose_apply(y: np.ndarray, A: np.ndarray, b: np.ndarray | None) -> np.ndarray:
    """x = (y - b) @ A (faiss's LinearTransform.transform_transpose: the inverse of an
    orthonormal y = x A^T + b), summed over j = 0, 1, ... in that order for every element:
    elementwise IEEE float32 steps, so one vector's result never depends on the others."""
    if b is not None:
        y = y - b
    # the same steps on the transposed batch: each is a long contiguous vector times a scalar
    # (2x less CPU than broadcasting a column over rows of head_dim, bench/fetch.py)
    yt = np.ascontiguousarray(y.T)
    xt = np.zeros((A.shape[1], len(y)), np.float32)
    tmp = np.empty_like(xt)
    for j in range(A.shape[0]):
        np.multiply(yt[j], A[j][:, None], out=tmp)
        xt += tmp
    return np.ascontiguousarray(xt.T)
