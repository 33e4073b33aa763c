"""Reading memories for the model: fetch(ref_ids) -> decoded tensors, through a RAM cache.

The paper keeps a fixed-size RAM cache of recently used memories because adjacent chunks often
retrieve the same references; this is that cache (LRU, bounded by entries). A store is bound to
one model: opening the memories of another model's bank fails, naming both hashes, because a
memory is only readable by the weights that wrote it.

Lookups resolve ref_id -> row once (a dict built from the ref_id column) and then read only the
rows asked for with Lance's `take`, from the pinned table version, so a rebuild committing
meanwhile cannot change what this store returns. With no version given, the store pins the
bank's `live` version (storage/live.py) when the bank has one, else the latest: a reader never
sees a rebuild that has not finished.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Sequence

import lance
import numpy as np
import torch

from model.codecs import CodecError, make_codec
from storage.bank import Bank, BankError
from storage.layout import BankLayout, upath


class MemoryStore:
    def __init__(self, bank: Bank, model_hash: str, cache_size: int = 4096, version: int | str | None = None):
        from storage.live import live_versions

        meta = bank.metadata("memories")
        if version is None:
            version = bank.pins.get("memories", live_versions(bank.uri).get("memories"))
        if version is not None:
            ds = lance.dataset(BankLayout(bank.uri).table("memories"), version=version)
            meta = _meta(ds)
        else:
            ds = bank.dataset("memories")
        if meta.get("model_hash") != model_hash:
            raise BankError(f"the memories in {bank.uri} were written by model {meta.get('model_hash')}, "
                            f"not by this model {model_hash}: re-encode the bank with this model (m3 encode)")
        self.ds, self.meta, self.cache_size = ds, meta, cache_size
        kw = {}
        if meta.get("codec") == "vq":
            path = meta.get("quantizer_path")
            if not path or not upath(path).exists():
                raise BankError(f"memories are vq-coded with quantizer {meta.get('quantizer_hash')}, "
                                f"but its file {path!r} is missing from the bank")
            kw = {"quantizer": path, "quantizer_hash": meta.get("quantizer_hash")}
        self.codec = make_codec(meta["codec"], **kw)
        ids = ds.to_table(columns=["ref_id"]).column("ref_id").to_pylist()
        self.row_of = {r: i for i, r in enumerate(ids)}
        first = ds.take([0], columns=["shape"]).column("shape")[0].as_py() if ids else None
        self.shape = tuple(first) if first else None
        self.cache: OrderedDict[str, tuple[torch.Tensor, torch.Tensor]] = OrderedDict()
        self.hits = self.misses = 0

    def __len__(self) -> int:
        return len(self.row_of)

    def fetch(self, ref_ids: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Memories (n, n_mem_layers, 2, n_kv_heads, k, head_dim) float32 and their slot mask
        (n, k), in the order asked; repeated ids are read once."""
        missing = [r for r in dict.fromkeys(ref_ids) if r not in self.cache]
        self.hits += len(ref_ids) - len(missing)
        self.misses += len(missing)
        loaded = self._load(missing) if missing else {}
        out = []
        for r in ref_ids:
            if r in self.cache:
                self.cache.move_to_end(r)
            out.append(loaded[r] if r in loaded else self.cache[r])
        # insert after assembling: a request larger than the cache must still be answered whole
        for r, item in loaded.items():
            self.cache[r] = item
        while len(self.cache) > self.cache_size:
            self.cache.popitem(last=False)
        if not out:
            k = self.shape[3] if self.shape else 0
            return torch.zeros((0, *(self.shape or (0, 2, 0, 0, 0)))), torch.zeros((0, k), dtype=torch.bool)
        return torch.stack([m for m, _ in out]), torch.stack([k for _, k in out])

    def _load(self, ref_ids: list[str]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        try:
            rows = np.array([self.row_of[r] for r in ref_ids], dtype=np.int64)
        except KeyError as e:
            raise BankError(f"no memory for reference {e.args[0]!r} in this bank") from None
        order = np.argsort(rows)  # take() reads sequentially when rows are sorted
        table = self.ds.take(rows[order], columns=["ref_id", "payload", "n_tokens"])
        payloads = table.column("payload").to_pylist()
        try:
            mems = self.codec.decode_batch(payloads, self.shape)
        except CodecError as e:
            bad = next((table.column("ref_id")[i].as_py() for i, p in enumerate(payloads)
                        if len(p) != self.codec.nbytes(self.shape)), "?")
            raise BankError(f"corrupt memory payload for reference {bad!r}: {e}") from None
        k = self.shape[3]
        kept = torch.as_tensor(table.column("n_tokens").to_numpy().astype(np.int64))
        masks = torch.arange(k)[None, :] < kept[:, None]
        # clones: a view would keep its whole decoded batch alive and break the cache's bound
        return {ref: (mems[i].clone(), masks[i].clone()) for i, ref in enumerate(table.column("ref_id").to_pylist())}


def _meta(ds) -> dict:
    import json

    from storage.bank import META_KEY

    raw = (ds.schema.metadata or {}).get(META_KEY)
    return json.loads(raw) if raw else {}
