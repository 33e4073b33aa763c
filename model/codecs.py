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

import math
import os
import sys
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import Tensor

from model.codec_base import Codec, CodecError, _check_shape

# the vector quantizer is most of the code: model/vq.py; model.codecs is the one place to get any codec from
from model.vq import VQCodec, default_spec, faiss_spec, min_train_vectors  # noqa: F401

__all__ = [
    "Codec",
    "CodecError",
    "RawCodec",
    "Int8Codec",
    "VQCodec",
    "CODECS",
    "PAPER_SPEC",
    "make_codec",
    "bytes_per_memory",
    "default_spec",
    "faiss_spec",
    "min_train_vectors",
]

if sys.byteorder != "little":  # payloads are little-endian and decoded by zero-copy views
    raise ImportError("model.codecs needs a little-endian host")

PAPER_SPEC = "OPQ20x80-Residual2x14-PQ8x10"


_RAW = {
    "bf16": (torch.bfloat16, np.dtype("<u2")),
    "fp16": (torch.float16, np.dtype("<f2")),
    "fp32": (torch.float32, np.dtype("<f4")),
}
_RAW_ALIASES = {
    "bfloat16": "bf16",
    torch.bfloat16: "bf16",
    "float16": "fp16",
    "half": "fp16",
    torch.float16: "fp16",
    "float32": "fp32",
    "float": "fp32",
    torch.float32: "fp32",
    **{short: short for short in _RAW},
}


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
            raise CodecError(
                f"int8: |x| up to {amax.max():.3g} exceeds the float16 scale range (max {_F16_MAX * 127:.3g})"
            )
        scale = want.to(torch.float16)
        # below want, or flushed to 0 for a vector of float32 subnormals: one float16 step up
        low = (scale.float() < want) | ((scale == 0) & (amax > 0))
        scale = torch.where(low, torch.nextafter(scale, torch.full_like(scale, math.inf)), scale)
        s = scale.float()
        q = torch.round(v / torch.where(s > 0, s, 1)[:, None]).clamp_(-127, 127).to(torch.int8)
        return np.concatenate(
            [scale.view(torch.int16).numpy().view(np.uint8).reshape(B, -1), q.numpy().view(np.uint8).reshape(B, -1)],
            axis=1,
        )

    def _decode(self, buf: np.ndarray, shape: tuple[int, ...]) -> Tensor:
        B, n, d = len(buf), math.prod(shape[:-1]), shape[-1]
        # one multiply over views of the payloads (no contiguous copies, no float32 copy of the
        # codes): torch casts both operands to float32 inside the kernel, the same products
        scale = torch.from_numpy(buf[:, : 2 * n].view(np.float16)).float()
        q = torch.from_numpy(buf[:, 2 * n :].view(np.int8)).view(B, n, d)
        return torch.mul(q, scale.view(B, n, 1))


def _make_vq(quantizer: str | os.PathLike | bytes | None = None, quantizer_hash: str | None = None) -> VQCodec:
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
