"""Memory codecs: one explicit memory (n_mem_layers, 2, n_kv_heads, k, head_dim) <-> bytes.

Every codec has `name`, `nbytes(shape)`, `encode`/`decode` for one memory and
`encode_batch`/`decode_batch`, which make one torch/faiss call for the whole batch (the only
per-memory Python work is cutting the result into one `bytes` per memory). Payloads are bare
little-endian codes, no header, so their size is exactly the paper's figure; the bank records
what produced a payload (codec name, VQ quantizer hash) beside it and passes the hash back to
`decode(..., quantizer_hash=)`, so a payload is never decoded by the wrong quantizer.

- RawCodec: the tensor's bytes in bf16 / fp16 / fp32 (bf16 as its uint16 bit pattern).
- Int8Codec: per head_dim vector a float16 scale, then the vector as int8.
- VQCodec: a trained FAISS quantizer for every head_dim vector [paper §3.3, App. B:
  `OPQ20x80-Residual2x14-PQ8x10`, 14 B per 80-dim vector].
"""

from __future__ import annotations

import hashlib
import math
import os
import re
import sys
from pathlib import Path
from typing import Any, Callable, Sequence

import faiss
import numpy as np
import torch
from torch import Tensor

if sys.byteorder != "little":  # payloads are little-endian and decoded by zero-copy views
    raise ImportError("model.codecs needs a little-endian host")

PAPER_SPEC = "OPQ20x80-Residual2x14-PQ8x10"
MEMORY_NDIM = 5  # (n_mem_layers, 2, n_kv_heads, k, head_dim)


class CodecError(ValueError):
    """A payload, shape, quantizer or codec name that cannot be used; the message says why."""


def _check_shape(shape: Sequence[int]) -> tuple[int, ...]:
    shape = tuple(int(s) for s in shape)
    if len(shape) != MEMORY_NDIM or any(s < 0 for s in shape) or shape[-1] < 1:
        raise CodecError(f"a memory shape is (n_mem_layers, 2, n_kv_heads, k, head_dim), "
                         f"got {shape}")
    return shape


def _as_batch(mems: Tensor | Sequence[Tensor]) -> Tensor:
    if not isinstance(mems, Tensor):
        mems = torch.stack(list(mems))
    if mems.dim() != MEMORY_NDIM + 1 or not mems.is_floating_point():
        raise CodecError(f"expected a float batch (B, n_mem_layers, 2, n_kv_heads, k, head_dim), "
                         f"got {mems.dtype} {tuple(mems.shape)}")
    return mems.detach().cpu()


class Codec:
    name: str = "?"

    def nbytes(self, shape: Sequence[int]) -> int:
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        """What the bank records with a row so that the codec can be rebuilt (JSON-able)."""
        return {"codec": self.name}

    def encode(self, mem: Tensor) -> bytes:
        if not isinstance(mem, Tensor) or mem.dim() != MEMORY_NDIM:
            raise CodecError(f"{self.name}: encode takes one memory (n_mem_layers, 2, "
                             f"n_kv_heads, k, head_dim), got {getattr(mem, 'shape', type(mem))}")
        return self.encode_batch(mem.unsqueeze(0))[0]

    def decode(self, payload: bytes, shape: Sequence[int], dtype: torch.dtype = torch.float32,
               quantizer_hash: str | None = None) -> Tensor:
        return self.decode_batch([payload], shape, dtype, quantizer_hash)[0]

    def encode_batch(self, mems: Tensor | Sequence[Tensor]) -> list[bytes]:
        if len(mems) == 0:
            return []
        x = _as_batch(mems)
        rows = self._encode(x)  # (B, nbytes) uint8, one row per memory
        return [row.tobytes() for row in rows]

    def decode_batch(self, payloads: Sequence[bytes], shape: Sequence[int],
                     dtype: torch.dtype = torch.float32,
                     quantizer_hash: str | None = None) -> Tensor:
        shape = _check_shape(shape)
        self._check_quantizer(quantizer_hash)
        expected = self.nbytes(shape)
        for i, p in enumerate(payloads):
            actual = memoryview(p).nbytes
            if actual != expected:
                raise CodecError(f"corrupt payload for codec {self.name}: payload {i} is {actual} "
                                 f"bytes, expected {expected} for memory shape {shape}")
        if not payloads:
            return torch.empty((0, *shape), dtype=dtype)
        # a bytearray, unlike bytes, is writable, so torch can share it without a copy
        buf = np.frombuffer(bytearray().join(payloads), dtype=np.uint8)
        out = self._decode(buf.reshape(len(payloads), expected), shape)
        return out.reshape(len(payloads), *shape).to(dtype)

    def _check_quantizer(self, quantizer_hash: str | None) -> None:
        # a hash handed to a codec without a quantizer means the caller mixed up rows and codecs
        if quantizer_hash is not None:
            raise CodecError(f"codec {self.name} uses no quantizer, but the payload records "
                             f"quantizer {quantizer_hash}")

    def _encode(self, x: Tensor) -> np.ndarray:
        raise NotImplementedError

    def _decode(self, buf: np.ndarray, shape: tuple[int, ...]) -> Tensor:
        """(B, nbytes) uint8 -> a float tensor with B * prod(shape) elements."""
        raise NotImplementedError


# short name -> (torch dtype, numpy dtype of the stored bits)
_RAW = {"bf16": (torch.bfloat16, np.dtype("<u2")), "fp16": (torch.float16, np.dtype("<f2")),
        "fp32": (torch.float32, np.dtype("<f4"))}
_RAW_ALIASES = {"bfloat16": "bf16", torch.bfloat16: "bf16", "float16": "fp16", "half": "fp16",
                torch.float16: "fp16", "float32": "fp32", "float": "fp32", torch.float32: "fp32",
                **{short: short for short in _RAW}}


class RawCodec(Codec):
    """Exact bytes of the memory in `dtype`: lossless when the input already has that dtype."""

    def __init__(self, dtype: str | torch.dtype = "bfloat16"):
        if dtype not in _RAW_ALIASES:
            raise CodecError(f"raw codec dtype must be bfloat16, float16 or float32, got {dtype!r}")
        self.short = _RAW_ALIASES[dtype]
        self.dtype, self._np = _RAW[self.short]
        self.name = f"raw-{self.short}"

    def nbytes(self, shape: Sequence[int]) -> int:
        return math.prod(_check_shape(shape)) * self._np.itemsize

    def _encode(self, x: Tensor) -> np.ndarray:
        t = x.to(self.dtype).contiguous()
        if self.dtype == torch.bfloat16:  # numpy has no bf16: move its bits through int16
            t = t.view(torch.int16)
        return t.numpy().reshape(len(x), -1).view(np.uint8)

    def _decode(self, buf: np.ndarray, shape: tuple[int, ...]) -> Tensor:
        if self.short == "bf16":
            return torch.from_numpy(buf.view(np.int16)).view(torch.bfloat16)
        return torch.from_numpy(buf.view(self._np))


_F16_MAX = float(np.finfo(np.float16).max)


class Int8Codec(Codec):
    """Symmetric int8 with one scale per head_dim vector.

    Payload of one memory with n vectors of d dims: n float16 scales, then n*d int8 codes, so
    d + 2 bytes per vector (82 for d=80, 2.6% less than a float32 scale). The float16 scale is
    rounded *up* from max|x|/127, so |x / scale| <= 127 always holds and every element's error
    is at most scale/2. The price: vectors with max|x| > 65504*127 (~8.3e6) cannot be
    stored (CodecError), far beyond any attention key or value.
    """

    name = "int8"

    def nbytes(self, shape: Sequence[int]) -> int:
        shape = _check_shape(shape)
        return math.prod(shape[:-1]) * (shape[-1] + 2)

    def _encode(self, x: Tensor) -> np.ndarray:
        B, d = len(x), x.shape[-1]
        v = x.to(torch.float32).reshape(-1, d)
        amax = v.abs().amax(dim=1) if v.numel() else v.new_zeros(len(v))
        if not torch.isfinite(amax).all():
            raise CodecError("int8: memory holds NaN or inf, which int8 cannot store")
        want = amax / 127
        if (want > _F16_MAX).any():
            raise CodecError(f"int8: |x| up to {amax.max():.3g} exceeds the float16 scale range "
                             f"(max {_F16_MAX * 127:.3g})")
        scale = want.to(torch.float16)
        # below want, or flushed to 0 for a vector of float32 subnormals: one float16 step up
        low = (scale.float() < want) | ((scale == 0) & (amax > 0))
        scale = torch.where(low, torch.nextafter(scale, torch.full_like(scale, math.inf)), scale)
        s = scale.float()
        q = torch.round(v / torch.where(s > 0, s, 1)[:, None]).clamp_(-127, 127).to(torch.int8)
        return np.concatenate([scale.view(torch.int16).numpy().view(np.uint8).reshape(B, -1),
                               q.numpy().view(np.uint8).reshape(B, -1)], axis=1)

    def _decode(self, buf: np.ndarray, shape: tuple[int, ...]) -> Tensor:
        B, n, d = len(buf), math.prod(shape[:-1]), shape[-1]
        scale = torch.from_numpy(np.ascontiguousarray(buf[:, : 2 * n]).view(np.float16))
        q = torch.from_numpy(np.ascontiguousarray(buf[:, 2 * n:]).view(np.int8))
        return q.view(B, n, d).float() * scale.view(B, n, 1).float()


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

    def __init__(self, index: faiss.Index | None = None, spec: str | None = None,
                 serialized: bytes | None = None):
        self.index, self.spec = index, spec
        if index is not None and serialized is None:
            serialized = faiss.serialize_index(index).tobytes()
        self._bytes = serialized
        self.quantizer_hash = hashlib.sha256(serialized).hexdigest() if serialized else None

    @classmethod
    def train(cls, vectors: np.ndarray | Tensor, spec: str | None = None, seed: int = 0, *,
              max_train: int | None = None, niter: int | None = None) -> "VQCodec":
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
            raise CodecError(f"vq: quantizer mismatch: expected quantizer {expected_hash}, "
                             f"got {actual}")
        try:
            index = faiss.deserialize_index(np.frombuffer(data, dtype=np.uint8).copy())
        except RuntimeError as e:
            raise CodecError(f"vq: quantizer {actual} is not a readable faiss index: {e}") from None
        if not index.is_trained:
            raise CodecError(f"vq: quantizer {actual} is not trained")
        return cls(index, serialized=bytes(data))

    @classmethod
    def load(cls, path: str | os.PathLike, expected_hash: str | None = None) -> "VQCodec":
        try:
            data = Path(path).read_bytes()
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
            want = f", but the payloads were encoded with quantizer {expected_hash}" \
                if expected_hash else ""
            raise CodecError(f"vq: no quantizer loaded{want}: load the quantizer stored with "
                             f"the bank")
        return self.index

    def _check_dim(self, d: int) -> None:
        if d != self.d:
            raise CodecError(f"vq: quantizer {self.quantizer_hash} codes {self.d}-dim vectors, "
                             f"memory has head_dim {d}")

    def _check_quantizer(self, quantizer_hash: str | None) -> None:
        self._require(quantizer_hash)
        if quantizer_hash is not None and quantizer_hash != self.quantizer_hash:
            raise CodecError(f"vq: quantizer mismatch: the payload was encoded with quantizer "
                             f"{quantizer_hash}, the loaded quantizer is {self.quantizer_hash}")

    def _encode(self, x: Tensor) -> np.ndarray:
        index = self._require()
        self._check_dim(x.shape[-1])
        v = x.to(torch.float32).contiguous().numpy().reshape(-1, x.shape[-1])
        if not np.isfinite(v).all():
            raise CodecError("vq: memory holds NaN or inf")
        return index.sa_encode(v).reshape(len(x), -1)

    def _decode(self, buf: np.ndarray, shape: tuple[int, ...]) -> Tensor:
        return torch.from_numpy(self.index.sa_decode(buf.reshape(-1, self.code_size)))


def _make_vq(quantizer: str | os.PathLike | bytes | None = None,
             quantizer_hash: str | None = None) -> VQCodec:
    if quantizer is None:
        return VQCodec()  # refuses to code until a quantizer is loaded
    if isinstance(quantizer, (bytes, bytearray, memoryview)):
        return VQCodec.from_bytes(bytes(quantizer), quantizer_hash)
    return VQCodec.load(quantizer, quantizer_hash)


CODECS: dict[str, Callable[..., Codec]] = {
    "raw": RawCodec,
    "raw-bf16": lambda: RawCodec("bfloat16"),
    "raw-fp16": lambda: RawCodec("float16"),
    "raw-fp32": lambda: RawCodec("float32"),
    "int8": Int8Codec,
    "vq": _make_vq,
}


def make_codec(name: str, **kw: Any) -> Codec:
    """make_codec("raw-bf16"), make_codec("raw", dtype="float16"), make_codec("int8"),
    make_codec("vq", quantizer=path_or_bytes, quantizer_hash=expected). A codec's `name`
    rebuilds it (plus the quantizer for vq)."""
    if name not in CODECS:
        raise CodecError(f"unknown codec {name!r}; known codecs: {', '.join(sorted(CODECS))}")
    try:
        return CODECS[name](**kw)
    except TypeError as e:
        raise CodecError(f"codec {name}: bad arguments {sorted(kw)}: {e}") from None


def bytes_per_memory(codec: Codec, shape: Sequence[int]) -> int:
    """Payload bytes of one memory of `shape` under `codec`."""
    return codec.nbytes(shape)
