"""What every memory codec shares: the memory's shape, the error a codec raises, and the
`Codec` base class (model/codecs.py has the codecs and the registry; model/vq.py the vector
quantizer). Its own module so that both build on it without importing each other."""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch
from torch import Tensor

from model.errors import M3Error

MEMORY_NDIM = 5  # (n_mem_layers, 2, n_kv_heads, k, head_dim)


class CodecError(M3Error, ValueError):
    """A payload, shape, quantizer or codec name that cannot be used; the message says why."""


def _check_shape(shape: Sequence[int]) -> tuple[int, ...]:
    shape = tuple(int(s) for s in shape)
    if len(shape) != MEMORY_NDIM or any(s < 0 for s in shape) or shape[-1] < 1:
        raise CodecError(f"a memory shape is (n_mem_layers, 2, n_kv_heads, k, head_dim), got {shape}")
    return shape


def _as_batch(mems: Tensor | Sequence[Tensor]) -> Tensor:
    if not isinstance(mems, Tensor):
        mems = torch.stack(list(mems))
    if mems.dim() != MEMORY_NDIM + 1 or not mems.is_floating_point():
        raise CodecError(
            f"expected a float batch (B, n_mem_layers, 2, n_kv_heads, k, head_dim), "
            f"got {mems.dtype} {tuple(mems.shape)}"
        )
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
            raise CodecError(
                f"{self.name}: encode takes one memory (n_mem_layers, 2, "
                f"n_kv_heads, k, head_dim), got {getattr(mem, 'shape', type(mem))}"
            )
        return self.encode_batch(mem.unsqueeze(0))[0]

    def decode(
        self,
        payload: bytes,
        shape: Sequence[int],
        dtype: torch.dtype = torch.float32,
        quantizer_hash: str | None = None,
    ) -> Tensor:
        return self.decode_batch([payload], shape, dtype, quantizer_hash)[0]

    def encode_batch(self, mems: Tensor | Sequence[Tensor]) -> list[bytes]:
        if len(mems) == 0:
            return []
        x = _as_batch(mems)
        rows = self._encode(x)  # (B, nbytes) uint8, one row per memory
        return [row.tobytes() for row in rows]

    def decode_batch(
        self,
        payloads: Sequence[bytes],
        shape: Sequence[int],
        dtype: torch.dtype = torch.float32,
        quantizer_hash: str | None = None,
    ) -> Tensor:
        shape = _check_shape(shape)
        self._check_quantizer(quantizer_hash)
        expected = self.nbytes(shape)
        for i, p in enumerate(payloads):
            actual = memoryview(p).nbytes
            if actual != expected:
                raise CodecError(
                    f"corrupt payload for codec {self.name}: payload {i} is {actual} "
                    f"bytes, expected {expected} for memory shape {shape}"
                )
        if not payloads:
            return torch.empty((0, *shape), dtype=dtype)
        # a bytearray, unlike bytes, is writable, so torch can share it without a copy
        buf = np.frombuffer(bytearray().join(payloads), dtype=np.uint8)
        out = self._decode(buf.reshape(len(payloads), expected), shape)
        return out.reshape(len(payloads), *shape).to(dtype)

    def round_trip(self, mems: Tensor, quantizer_hash: str | None = None) -> Tensor:
        """mems (B, n_mem_layers, 2, n_kv_heads, k, head_dim) as a reader gets them back after
        this codec stored them: encode then decode, float32 on the CPU. Training reads memories
        through it so that the model learns to read what the bank serves (model/train_step.py)."""
        x = _as_batch(mems)
        own = getattr(self, "quantizer_hash", None)  # a vq codec decodes with its own quantizer
        return self.decode_batch(self.encode_batch(x), x.shape[1:], torch.float32, quantizer_hash or own)

    def _check_quantizer(self, quantizer_hash: str | None) -> None:
        # a hash handed to a codec without a quantizer means the caller mixed up rows and codecs
        if quantizer_hash is not None:
            raise CodecError(f"codec {self.name} uses no quantizer, but the payload records quantizer {quantizer_hash}")

    def _encode(self, x: Tensor) -> np.ndarray:
        raise NotImplementedError

    def _decode(self, buf: np.ndarray, shape: tuple[int, ...]) -> Tensor:
        """(B, nbytes) uint8 -> a float tensor with B * prod(shape) elements."""
        raise NotImplementedError


# short name -> (torch dtype, numpy dtype of the stored bits)
