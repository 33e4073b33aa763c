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

Cold references (paper §3.1, "cold start"): a bank may hold references without memories
(`encode.cold: true` writes none for references never encoded; references added since the last
encode have none either). The first fetch of one encodes it with the store's model (the model
hash the memories' lineage names; its `model_dir` is loaded, hash checked, unless the caller
passes the model), through the bank's codec and at its sparsity with the encode stage's own
routine (model/ref_batches.py: batch-invariant, so the bytes equal what `m3 encode` stores),
serves it, and writes the rows of that fetch back in one file (storage/warm.py, which says why
a write-back never races a rebuild). Later fetches, by this store or one opened later, read
them from there; the next `m3 encode`/`m3 rebuild` copies them into `memories`. A reference is
looked up in `memories`, then in the written-back rows of this model, codec and sparsity whose
content hash is still the reference's, and only then encoded. `encoded`, `stored_reads` and
`warm_reads` count what each fetch did (besides the RAM cache's hits and misses).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Sequence

import lance
import numpy as np
import torch

from model.codecs import CodecError, make_codec
import pyarrow as pa
import pyarrow.compute as pc

from storage.bank import Bank, BankError
from storage.layout import BankLayout, upath
from storage.schemas import MEMORIES
from storage.staging import read_table
from storage.warm import key_of, warm_files, write_warm


class MemoryStore:
    def __init__(self, bank: Bank, model_hash: str, cache_size: int = 4096, version: int | str | None = None,
                 *, model=None, write_back: bool = True):
        from storage.live import live_versions

        meta = bank.metadata("memories")
        live = live_versions(bank.uri)
        self.refs_version = bank.pins.get("refs", live.get("refs"))
        if version is None:
            version = bank.pins.get("memories", live.get("memories"))
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
        self.shape = tuple(first) if first else _lineage_shape(meta)
        self.cache: OrderedDict[str, tuple[torch.Tensor, torch.Tensor]] = OrderedDict()
        self.hits = self.misses = 0
        # cold references: written-back rows of this model, codec and sparsity (storage/warm.py)
        self.bank_uri, self.model_hash, self.model, self.write_back = bank.uri, model_hash, model, write_back
        self.warm_key = key_of(meta)
        self.warm_at: dict[str, tuple[str, object, int]] = {}  # ref_id -> (content_hash, file, row)
        for f in warm_files(bank.uri, self.warm_key):
            self._index_warm(f, read_table(f, columns=["ref_id", "content_hash", "model_hash"]))
        self.encoded = self.stored_reads = self.warm_reads = self.written_back = 0

    def _index_warm(self, path, t: pa.Table) -> None:
        for i, (r, h, m) in enumerate(zip(*(t.column(c).to_pylist() for c in ("ref_id", "content_hash", "model_hash")))):
            if m == self.model_hash and r not in self.warm_at:
                self.warm_at[r] = (h, path, i)

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
        stored = [r for r in ref_ids if r in self.row_of]
        out = self._load_stored(stored) if stored else {}
        self.stored_reads += len(stored)
        rest = [r for r in ref_ids if r not in self.row_of]
        if rest:
            tokens, hashes = self._refs(rest)
            warm = [r for r in rest if r in self.warm_at and self.warm_at[r][0] == hashes[r]]
            cold = [r for r in rest if r not in set(warm)]
            if warm:
                out.update(self._load_warm(warm))
                self.warm_reads += len(warm)
            if cold:
                out.update(self._encode(cold, tokens, hashes))
        return out

    def _load_stored(self, ref_ids: list[str]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        rows = np.array([self.row_of[r] for r in ref_ids], dtype=np.int64)
        order = np.argsort(rows)  # take() reads sequentially when rows are sorted
        return self._decoded(self.ds.take(rows[order], columns=["ref_id", "payload", "n_tokens"]))

    def _refs(self, ref_ids: list[str]) -> tuple[dict[str, list[int]], dict[str, str]]:
        """Token ids and content hashes of references without a stored memory, from the refs of
        this store's build; a reference the bank does not hold is an error, as before."""
        refs = lance.dataset(BankLayout(self.bank_uri).table("refs"), version=self.refs_version)
        t = refs.to_table(columns=["ref_id", "content_hash", "token_ids"], filter=pc.field("ref_id").isin(ref_ids))
        ids = t.column("ref_id").to_pylist()
        missing = [r for r in ref_ids if r not in set(ids)]
        if missing:
            raise BankError(f"no memory for reference {missing[0]!r} in this bank, and no such reference")
        return (dict(zip(ids, t.column("token_ids").to_pylist())), dict(zip(ids, t.column("content_hash").to_pylist())))

    def _load_warm(self, ref_ids: list[str]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        by_file: dict[object, list[int]] = {}
        for r in ref_ids:
            by_file.setdefault(self.warm_at[r][1], []).append(self.warm_at[r][2])
        out = {}
        for path, rows in by_file.items():
            t = read_table(path, columns=["ref_id", "payload", "n_tokens"]).take(pa.array(sorted(rows), pa.int64()))
            out.update(self._decoded(t))
        return out

    def _encoder(self):
        if self.model is None:
            from model.checkpoint import load_model, saved_hash

            mdir = self.meta.get("model_dir")
            if not mdir or not upath(mdir).exists() or saved_hash(mdir) != self.model_hash:
                raise BankError(f"reference(s) of {self.bank_uri} have no memory yet, and the model "
                                f"{self.model_hash[:16]}... that must encode them is not at {mdir!r}: "
                                f"pass it to the MemoryStore or run `m3 encode`")
            self.model = load_model(mdir)
        return self.model

    def _encode(self, ref_ids: list[str], tokens: dict, hashes: dict) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Encode cold references as `m3 encode` would (sorted by length, the encode stage's batch
        size), then write their rows back in one file."""
        from model.ref_batches import encode_tokens

        model = self._encoder()
        m = model.config
        order = sorted(ref_ids, key=lambda r: (len(tokens[r]), r))
        batch = int(((self.meta.get("config") or {}).get("encode") or {}).get("batch_size", 32))
        cols: dict[str, list] = {name: [] for name in MEMORIES.names}
        for lo in range(0, len(order), batch):
            ids = order[lo:lo + batch]
            payloads, positions, kept = encode_tokens(model, self.codec, [tokens[r] for r in ids])
            shape = [m.n_mem_layers, 2, m.n_kv_heads, positions.shape[-1], m.head_dim]
            if self.shape is None:
                self.shape = tuple(shape)
            elif tuple(shape) != tuple(self.shape):
                raise BankError(f"the model encodes memories of shape {shape}, the bank stores {list(self.shape)}")
            for j, r in enumerate(ids):
                cols["ref_id"].append(r)
                cols["content_hash"].append(hashes[r])
                cols["positions"].append(positions[j].reshape(-1))
                cols["n_tokens"].append(int(kept[j]))
                cols["payload"].append(payloads[j])
        n = len(cols["ref_id"])
        cols.update(model_hash=[self.model_hash] * n, codec=[self.codec.name] * n, shape=[list(self.shape)] * n)
        rows = pa.table(cols, schema=MEMORIES)
        self.encoded += n
        if self.write_back:
            path = write_warm(self.bank_uri, self.warm_key, rows)
            for i, r in enumerate(cols["ref_id"]):
                self.warm_at[r] = (hashes[r], path, i)
            self.written_back += n
        return self._decoded(rows)

    def _decoded(self, table: pa.Table) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
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


def _lineage_shape(meta: dict) -> tuple | None:
    """The shape of one memory from the lineage (a table that holds no row yet: all cold)."""
    model, sp = (meta.get("config") or {}).get("model") or {}, meta.get("sparsity") or {}
    try:
        return (model["n_mem_layers"], 2, model["n_kv_heads"], sp.get("top_k", model["mem_top_k"]), model["head_dim"])
    except KeyError:
        return None


def _meta(ds) -> dict:
    import json

    from storage.bank import META_KEY

    raw = (ds.schema.metadata or {}).get(META_KEY)
    return json.loads(raw) if raw else {}
