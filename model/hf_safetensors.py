"""safetensors read and written one tensor at a time, so an import holds one tensor, not a model.

The format is a little-endian u64 header length, a JSON header ({name: {dtype, shape,
data_offsets}}, "__metadata__"), then the bytes. Reading seeks and reads each tensor into its own
buffer (no mmap: mapped pages of a multi-GB file would count against the process as it walks
them). Writing lays the header out from the shapes first, streams each tensor's bytes, and
patches the metadata at the end: the model hash (model/checkpoint.py) covers every byte, so it
is known only after the last tensor, and it has a fixed length.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import BinaryIO, Iterable

import torch

from .hf_config import HFModelError

DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}
NAMES = {v: k for k, v in DTYPES.items()}
_MAX_HEADER = 100 * 1024 * 1024  # what safetensors itself accepts


class TensorIndex:
    """Where each tensor of a model directory lives: one model.safetensors, or the shards a
    model.safetensors.index.json names (or every *.safetensors when there is no index)."""

    def __init__(self, directory: str | Path):
        directory = Path(directory)
        index = directory / "model.safetensors.index.json"
        if index.exists():
            try:
                files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            except (ValueError, KeyError, AttributeError) as e:
                raise HFModelError(f"{index}: expected JSON with a weight_map ({e})") from None
        else:
            files = sorted(p.name for p in directory.glob("*.safetensors"))
        if not files:
            raise HFModelError(f"{directory}: no *.safetensors weights (.bin checkpoints are not read: they unpickle)")
        self.entries: dict[str, tuple[Path, torch.dtype, tuple[int, ...], int, int]] = {}
        for name in files:
            self._read_header(directory / name)

    def _read_header(self, path: Path) -> None:
        try:
            size = path.stat().st_size
            with open(path, "rb") as f:
                (n,) = struct.unpack("<Q", f.read(8))
                if n > min(_MAX_HEADER, size - 8):
                    raise ValueError(f"header length {n} exceeds the file")
                header = json.loads(f.read(n))
        except (OSError, ValueError, struct.error) as e:
            raise HFModelError(f"{path}: not a safetensors file ({e})") from None
        start = 8 + n
        for name, info in header.items():
            if name == "__metadata__":
                continue
            try:
                dtype = DTYPES[info["dtype"]]
                shape = tuple(int(s) for s in info["shape"])
                begin, end = (int(o) for o in info["data_offsets"])
            except (KeyError, TypeError, ValueError):
                raise HFModelError(
                    f"{path}: tensor {name!r} has dtype {info.get('dtype') if isinstance(info, dict) else info!r}; "
                    f"expected one of {', '.join(DTYPES)} with shape and data_offsets"
                ) from None
            numel = 1
            for s in shape:
                numel *= s
            if end - begin != numel * dtype.itemsize or start + end > size:
                raise HFModelError(f"{path}: tensor {name!r} is truncated or its offsets disagree with its shape")
            self.entries[name] = (path, dtype, shape, start + begin, end - begin)

    def __contains__(self, name: str) -> bool:
        return name in self.entries

    def shape(self, name: str) -> tuple[int, ...]:
        return self.entries[name][2]

    def dtype(self, name: str) -> torch.dtype:
        return self.entries[name][1]

    def read(self, name: str) -> torch.Tensor:
        if name not in self.entries:
            raise HFModelError(f"weights: tensor {name!r} is missing")
        path, dtype, shape, offset, nbytes = self.entries[name]
        buf = torch.empty(nbytes, dtype=torch.uint8)
        with open(path, "rb") as f:
            f.seek(offset)
            if f.readinto(memoryview(buf.numpy())) != nbytes:
                raise HFModelError(f"{path}: tensor {name!r} is truncated")
        return buf.view(dtype).reshape(shape)


def _tensor_bytes(t: torch.Tensor):
    return t.detach().contiguous().reshape(-1).view(torch.uint8).numpy()


class StreamWriter:
    """Write tensors of known names, dtypes and shapes to one safetensors file, in the order
    given (header order = data order), then patch metadata values of fixed length."""

    def __init__(self, path: Path, specs: Iterable[tuple[str, torch.dtype, tuple[int, ...]]], metadata: dict):
        self.path, self.specs = Path(path), list(specs)
        header: dict = {"__metadata__": metadata}
        offset = 0
        for name, dtype, shape in self.specs:
            numel = 1
            for s in shape:
                numel *= s
            header[name] = {
                "dtype": NAMES[dtype],
                "shape": list(shape),
                "data_offsets": [offset, offset + numel * dtype.itemsize],
            }
            offset += numel * dtype.itemsize
        self.header = header
        self._header_len = len(self._encode(header))
        self.f: BinaryIO = open(self.path, "wb")
        self.f.write(self._encode(header))
        self.i = 0

    def _encode(self, header: dict) -> bytes:
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # tensors 8-byte aligned, as safetensors writes them
        return struct.pack("<Q", len(raw)) + raw

    def write(self, name: str, t: torch.Tensor) -> None:
        want, dtype, shape = self.specs[self.i]
        if name != want or t.dtype != dtype or tuple(t.shape) != tuple(shape):
            raise ValueError(f"writer: expected {want} {dtype} {shape}, got {name} {t.dtype} {tuple(t.shape)}")
        self.f.write(_tensor_bytes(t).tobytes() if not t.is_contiguous() else memoryview(_tensor_bytes(t)))
        self.i += 1

    def close(self, metadata: dict) -> None:
        if self.i != len(self.specs):
            raise ValueError(f"writer: {len(self.specs) - self.i} tensor(s) never written")
        header = {**self.header, "__metadata__": metadata}
        encoded = self._encode(header)
        if len(encoded) != self._header_len:
            raise ValueError("writer: metadata changed length")
        self.f.seek(0)
        self.f.write(encoded)
        self.f.close()
