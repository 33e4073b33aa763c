"""Reading memories for the model: fetch(ref_ids) -> decoded tensors, through a RAM cache.

The paper keeps a fixed-size RAM cache of recently used memories because adjacent chunks often
retrieve the same references; this is that cache (LRU). Its bound is exact and in bytes: one
preallocated tensor of `capacity` memories plus their kept-token counts, never more, whatever
the requests (`cache_bytes`; `cache_size` entries is the same bound in entries). A store is bound
to one model: opening the memories of another model's bank fails, naming both hashes, because a
memory is only readable by the weights that wrote it.

Lookups resolve ref_id -> row once (a dict built from the ref_id column, with each row's kept
token count, so masks come from RAM) and then read only the rows asked for, from the pinned
table version, so a rebuild committing meanwhile cannot change what this store returns: from
the version's payload slab (storage/slab.py: one flat file of fixed-size payloads, memory-mapped;
one copy per row) when the bank has one that matches the version, else with Lance's `take`. A
slab that does not match its table (another version, rows changed, a truncated file) is never
served: the store logs why and reads Lance (`slab_refused` keeps the reason; `slab="require"`
raises it instead, at open or at a row that fails its checksum). Falling back rather than
refusing to serve: the slab is a derived copy that the table can always replace, and the usual
cause of a mismatch is a version written since the slab (a compaction in `m3 rebuild`), not
damage to the table. Each row read from the slab is checked against its crc32 the first time
this store reads it (storage/slab.py SlabReader); a row that fails is never served: the store
logs one line, stops using the slab and reads Lance, whose rows it then checks against the same
crc32s (they were computed from Lance's payloads), so a memory damaged in both raises one line
(BankError) instead of serving other bytes; a Lance file that cannot be read is one line too
(storage/bank.py `readable`). With no version given, the store pins the bank's `live` version
(storage/live.py) when the bank has one, else the latest: a reader never sees a rebuild that
has not finished.

Memories come back in the codec's own dtype: raw-bf16 as bfloat16 (the bits of the payload,
reinterpreted, no float32 round trip), raw-fp16 as float16, raw-fp32, int8 and vq as float32 (what
their decoders compute). The model casts memories to its own dtype (model/transformer.py).

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
`warm_reads` count what each fetch did (besides the RAM cache's hits and misses), `slab_reads`
how many of the stored reads came from the slab.
"""

from __future__ import annotations

import logging
import math
from collections import OrderedDict
from itertools import repeat
from typing import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from model.codecs import RawCodec, make_codec
from storage.bank import Bank, BankError, readable
from storage.layout import upath
from storage.schemas import MEMORIES
from storage.slab import SlabCorrupt, SlabError, _fixed_rows, open_slab, row_crcs, row_digest
from storage.staging import read_table
from storage.warm import key_of, warm_files, write_warm

log = logging.getLogger(__name__)

_KEPT = np.dtype(np.int16)  # kept-token counts (n_tokens <= k <= ref_max_tokens)


def _byte_rows(mems: torch.Tensor) -> np.ndarray:
    """(n, ...) contiguous memories -> a (n, bytes per memory) uint8 view of the same memory.
    Copies of whole memories go through these views: numpy copies a row with one memcpy,
    where torch's index kernels on a 6-d bf16 tensor ran 5-20x slower (bench/fetch.py)."""
    return mems.contiguous().reshape(len(mems), -1).view(torch.uint8).numpy()


class MemoryStore:
    def __init__(
        self,
        bank: Bank,
        model_hash: str,
        cache_size: int = 4096,
        version: int | str | None = None,
        *,
        model=None,
        write_back: bool = True,
        cache_bytes: int | None = None,
        slab: str = "auto",
    ):
        from storage.live import live_versions

        if slab not in ("auto", "off", "require"):
            raise ValueError(f"slab must be 'auto', 'off' or 'require', got {slab!r}")
        meta = bank.metadata("memories")
        live = live_versions(bank)
        self.refs_version = bank.pins.get("refs", live.get("refs"))
        if version is None:
            version = bank.pins.get("memories", live.get("memories"))
        if version is not None:
            ds = bank.dataset("memories", version=version, check=False)
            meta = _meta(ds)
        else:
            ds = bank.dataset("memories")
        if meta.get("model_hash") != model_hash:
            raise BankError(
                f"the memories in {bank.uri} were written by model {meta.get('model_hash')}, "
                f"not by this model {model_hash}: re-encode the bank with this model (m3 encode)"
            )
        self.ds, self.meta = ds, meta
        kw = {}
        if meta.get("codec") == "vq":
            path = meta.get("quantizer_path")
            if not path or not upath(path).exists():
                raise BankError(
                    f"memories are vq-coded with quantizer {meta.get('quantizer_hash')}, "
                    f"but its file {path!r} is missing from the bank"
                )
            kw = {"quantizer": path, "quantizer_hash": meta.get("quantizer_hash")}
        self.codec = make_codec(meta["codec"], **kw)
        # the codec's own dtype: raw payloads are reinterpreted, never widened (module docstring)
        self.dtype = self.codec.dtype if isinstance(self.codec, RawCodec) else torch.float32
        index = ds.to_table(columns=["ref_id", "content_hash", "n_tokens"])
        ids = index.column("ref_id").to_pylist()
        self.row_of = {r: i for i, r in enumerate(ids)}
        self.kept_of_row = index.column("n_tokens").to_numpy().astype(_KEPT)
        first = ds.take([0], columns=["shape"]).column("shape")[0].as_py() if ids else None
        self.shape = tuple(first) if first else _lineage_shape(meta)
        self.slab, self.slab_refused, self._crcs, self._slab_mode = None, None, None, slab
        if slab != "off" and ids and self.shape is not None:
            digest = row_digest(ids, index.column("content_hash").to_pylist()).hexdigest()
            try:
                self.slab = open_slab(bank, ds, meta, self.codec.nbytes(self.shape), digest)
                self._crcs = self.slab.crcs  # checks Lance's rows too, should the slab fail one
            except SlabError as e:
                if slab == "require":
                    raise
                self.slab_refused = str(e)
                log.info("memories of %s version %s read through Lance: %s", bank.uri, ds.version, e)
        # the cache: ref_id -> slot in one preallocated tensor, LRU order = the dict's order
        self._cache_size, self._cache_bytes = cache_size, cache_bytes
        self.cache: OrderedDict[str, int] = OrderedDict()
        self._cache_rows = self._cache_kept = None  # (capacity, bytes per memory) uint8, (capacity,) int16
        self._free: list[int] = []
        self.hits = self.misses = 0
        self._slots = None  # torch.arange(k)[None, :]: a mask is slot < kept (built at the first fetch)
        # cold references: written-back rows of this model, codec and sparsity (storage/warm.py)
        self.bank, self.model_hash, self.model, self.write_back = bank, model_hash, model, write_back
        self.warm_key = key_of(meta)
        self.warm_at: dict[str, tuple[str, object, int]] = {}  # ref_id -> (content_hash, file, row)
        for f in warm_files(bank, self.warm_key):
            self._index_warm(f, read_table(f, columns=["ref_id", "content_hash", "model_hash"]))
        self.encoded = self.stored_reads = self.warm_reads = self.written_back = self.slab_reads = 0

    def _index_warm(self, path, t: pa.Table) -> None:
        for i, (r, h, m) in enumerate(
            zip(*(t.column(c).to_pylist() for c in ("ref_id", "content_hash", "model_hash")))
        ):
            if m == self.model_hash and r not in self.warm_at:
                self.warm_at[r] = (h, path, i)

    def __len__(self) -> int:
        return len(self.row_of)

    # -- the cache ------------------------------------------------------------------------------

    def entry_bytes(self) -> int:
        """Bytes one cached memory takes: its decoded tensor and its kept-token count."""
        return math.prod(self.shape) * self.dtype.itemsize + _KEPT.itemsize

    @property
    def capacity(self) -> int:
        """Memories the cache holds at most: cache_bytes // entry_bytes (or cache_size)."""
        if self.shape is None:
            return 0
        if self._cache_bytes is not None:
            return int(self._cache_bytes) // self.entry_bytes()
        return int(self._cache_size)

    def cache_nbytes(self) -> int:
        """Bytes of the tensors the cache holds (allocated once, at its first insert)."""
        return sum(a.nbytes for a in (self._cache_rows, self._cache_kept) if a is not None)

    def _insert(self, ids: list[str], mems: torch.Tensor, kept: np.ndarray) -> None:
        cap = self.capacity
        if cap == 0 or not ids:
            return
        if self._cache_rows is None:
            self._cache_rows = np.empty((cap, math.prod(self.shape) * self.dtype.itemsize), np.uint8)
            self._cache_kept = np.empty(cap, _KEPT)
            self._free = list(range(cap - 1, -1, -1))
        lo = max(0, len(ids) - cap)  # a request larger than the cache keeps its last `cap`
        k, free, cache = len(ids) - lo, self._free, self.cache
        if k > len(free):  # evict the least recently used
            pop = cache.popitem
            free += [pop(False)[1] for _ in range(k - len(free))]
        slots = free[-k:][::-1]  # as free.pop() k times
        del free[-k:]
        cache.update(zip(ids[lo:], slots))
        at = np.array(slots, np.intp)
        self._cache_rows[at] = _byte_rows(mems)[lo:]
        self._cache_kept[at] = kept[lo:]

    # -- fetch ----------------------------------------------------------------------------------

    def fetch(self, ref_ids: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Memories (n, n_mem_layers, 2, n_kv_heads, k, head_dim) in the codec's dtype and their
        slot mask (n, k), in the order asked; repeated ids are read once."""
        n = len(ref_ids)
        cache, missing = self.cache, []
        uniq = dict.fromkeys(ref_ids)
        for r in uniq:  # one pass: refresh the hits, collect the misses
            if r in cache:
                cache.move_to_end(r)
            else:
                missing.append(r)
        self.hits += n - len(missing)
        self.misses += len(missing)
        if missing:
            mems, kept = self._load(missing)
        if n == 0 or self.shape is None:
            k = self.shape[3] if self.shape else 0
            return torch.zeros((0, *(self.shape or (0, 2, 0, 0, 0))), dtype=self.dtype), torch.zeros(
                (0, k), dtype=torch.bool
            )
        if len(missing) == n:  # all distinct misses (the usual batch): the decoded batch is the answer
            out, out_kept = mems, kept
        elif len(uniq) <= self.capacity:
            # every id asked fits in the cache at once: the misses go in first (the hits, just
            # refreshed, are not the least recently used), then one gather answers the whole
            # request, repeated ids included
            if missing:
                self._insert(missing, mems, kept)
                missing = []
            at = np.fromiter(map(cache.__getitem__, ref_ids), np.intp, n)
            out = torch.from_numpy(self._cache_rows.take(at, axis=0)).view(self.dtype).reshape(n, *self.shape)
            out_kept = self._cache_kept[at]
        else:
            rows = np.empty(
                (
                    n,
                    self._cache_rows.shape[1]
                    if self._cache_rows is not None
                    else math.prod(self.shape) * self.dtype.itemsize,
                ),
                np.uint8,
            )
            out_kept = np.empty(n, _KEPT)
            new = {r: j for j, r in enumerate(missing)}
            hit_i, hit_s, new_i, new_j = [], [], [], []
            for i, r in enumerate(ref_ids):
                if r in new:
                    new_i.append(i)
                    new_j.append(new[r])
                else:
                    hit_i.append(i)
                    hit_s.append(cache[r])
            if hit_i:
                rows[hit_i] = self._cache_rows[hit_s]
                out_kept[hit_i] = self._cache_kept[hit_s]
            if new_i:
                rows[new_i] = _byte_rows(mems)[new_j]
                out_kept[new_i] = kept[new_j]
            out = torch.from_numpy(rows).view(self.dtype).reshape(n, *self.shape)
        if self._slots is None or self._slots.shape[1] != self.shape[3]:
            self._slots = torch.arange(self.shape[3])[None, :]
        masks = self._slots < torch.from_numpy(out_kept)[:, None]
        # insert after answering: a request larger than the cache must still be answered whole
        if missing:
            self._insert(missing, mems, kept)
        return out, masks

    def _load(self, ref_ids: list[str]) -> tuple[torch.Tensor, np.ndarray]:
        """(memories, kept counts) of `ref_ids`, in that order."""
        row_of = self.row_of
        rows = np.fromiter(map(row_of.get, ref_ids, repeat(-1)), np.int64, len(ref_ids))
        if rows.min() >= 0:  # all stored (the usual batch)
            self.stored_reads += len(rows)
            return self._read_rows(rows, ref_ids)
        stored = [r for r in ref_ids if r in row_of]
        self.stored_reads += len(stored)
        parts = []  # (ids, mems, kept)
        if stored:
            parts.append(
                (stored, *self._read_rows(np.fromiter((row_of[r] for r in stored), np.int64, len(stored)), stored))
            )
        rest = [r for r in ref_ids if r not in row_of]
        tokens, hashes = self._refs(rest)
        warm = [r for r in rest if r in self.warm_at and self.warm_at[r][0] == hashes[r]]
        cold = [r for r in rest if r not in set(warm)]
        if warm:
            parts.append(self._load_warm(warm))
            self.warm_reads += len(warm)
        if cold:
            parts.append(self._encode(cold, tokens, hashes))
        pos = {r: i for i, r in enumerate(ref_ids)}
        rows = np.empty((len(ref_ids), math.prod(self.shape) * self.dtype.itemsize), np.uint8)
        kept = np.empty(len(ref_ids), _KEPT)
        for ids, m, k in parts:
            at = [pos[r] for r in ids]
            rows[at] = _byte_rows(m)
            kept[at] = k
        return torch.from_numpy(rows).view(self.dtype).reshape(len(ref_ids), *self.shape), kept

    def _read_rows(self, rows: np.ndarray, ids: list[str]) -> tuple[torch.Tensor, np.ndarray]:
        """Stored rows of the pinned version: from the slab when there is one, else Lance."""
        kept = self.kept_of_row[rows]
        if self.slab is not None:
            try:
                buf = self.slab.read(rows)
            except SlabCorrupt as e:  # never served: Lance's rows instead, for the rest of this store
                if self._slab_mode == "require":
                    raise
                self.slab_refused = str(e)
                self.slab.close()
                self.slab = None
                log.warning(
                    "memories of %s version %s: %s; reading Lance from now on (run `m3 bank verify`)",
                    self.bank.uri,
                    self.ds.version,
                    e,
                )
            else:
                self.slab_reads += len(rows)
                return self._decode(buf, ids), kept
        order = np.argsort(rows, kind="stable")  # take() reads sequentially when rows are sorted
        with readable(self.bank, "memories"):
            payload = self.ds.take(rows[order], columns=["payload"]).column("payload")
        buf = np.empty((len(rows), self.codec.nbytes(self.shape)), np.uint8)
        buf[order] = self._rows_of(payload, [ids[i] for i in order])
        if self._crcs is not None and self.slab is None:  # the slab failed a row: check Lance's too
            bad = np.flatnonzero(row_crcs(buf) != self._crcs[rows])
            if len(bad):
                raise BankError(
                    f"memory of reference {ids[bad[0]]!r} (memories version {self.ds.version}, row "
                    f"{int(rows[bad[0]])}) is damaged in both the payload slab and Lance: it differs "
                    f"from the checksum written with it; run `m3 bank verify`"
                )
        return self._decode(buf, ids), kept

    def _rows_of(self, payload, ids: list[str]) -> np.ndarray:
        try:
            return _fixed_rows(payload, self.codec.nbytes(self.shape), ids)
        except SlabError as e:
            raise BankError(str(e)) from None

    def _decode(self, buf: np.ndarray, ids: list[str]) -> torch.Tensor:
        """(n, payload bytes) uint8 -> (n, *shape) memories in self.dtype. `buf` must be this
        call's own array: a raw codec's result is a view of it."""
        # the codec's batch decode of an array (Codec.decode_batch takes one bytes object per
        # payload and joins them: a copy this path exists to avoid); the quantizer was checked
        # when the codec was built from the lineage
        return self.codec._decode(buf, self.shape).reshape(len(buf), *self.shape).to(self.dtype)

    def _refs(self, ref_ids: list[str]) -> tuple[dict[str, list[int]], dict[str, str]]:
        """Token ids and content hashes of references without a stored memory, from the refs of
        this store's build; a reference the bank does not hold is an error, as before."""
        refs = self.bank.dataset("refs", version=self.refs_version, check=False)
        t = refs.to_table(columns=["ref_id", "content_hash", "token_ids"], filter=pc.field("ref_id").isin(ref_ids))
        ids = t.column("ref_id").to_pylist()
        missing = [r for r in ref_ids if r not in set(ids)]
        if missing:
            raise BankError(f"no memory for reference {missing[0]!r} in this bank, and no such reference")
        return (dict(zip(ids, t.column("token_ids").to_pylist())), dict(zip(ids, t.column("content_hash").to_pylist())))

    def _load_warm(self, ref_ids: list[str]) -> tuple[list[str], torch.Tensor, np.ndarray]:
        by_file: dict[object, list[int]] = {}
        for r in ref_ids:
            by_file.setdefault(self.warm_at[r][1], []).append(self.warm_at[r][2])
        ids, mems, kept = [], [], []
        for path, rows in by_file.items():
            t = read_table(path, columns=["ref_id", "payload", "n_tokens"]).take(pa.array(sorted(rows), pa.int64()))
            got, m, k = self._decoded(t)
            ids += got
            mems.append(m)
            kept.append(k)
        return ids, torch.cat(mems), np.concatenate(kept)

    def _encoder(self):
        if self.model is None:
            from model.checkpoint import load_model, saved_hash

            mdir = self.meta.get("model_dir")
            if not mdir or not upath(mdir).exists() or saved_hash(mdir) != self.model_hash:
                raise BankError(
                    f"reference(s) of {self.bank.uri} have no memory yet, and the model "
                    f"{self.model_hash[:16]}... that must encode them is not at {mdir!r}: "
                    f"pass it to the MemoryStore or run `m3 encode`"
                )
            self.model = load_model(mdir)
        return self.model

    def _encode(self, ref_ids: list[str], tokens: dict, hashes: dict) -> tuple[list[str], torch.Tensor, np.ndarray]:
        """Encode cold references as `m3 encode` would (sorted by length, the encode stage's batch
        size), then write their rows back in one file."""
        from model.ref_batches import encode_tokens

        model = self._encoder()
        m = model.config
        order = sorted(ref_ids, key=lambda r: (len(tokens[r]), r))
        batch = int(((self.meta.get("config") or {}).get("encode") or {}).get("batch_size", 32))
        cols: dict[str, list] = {name: [] for name in MEMORIES.names}
        for lo in range(0, len(order), batch):
            ids = order[lo : lo + batch]
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
            path = write_warm(self.bank, self.warm_key, rows)
            for i, r in enumerate(cols["ref_id"]):
                self.warm_at[r] = (hashes[r], path, i)
            self.written_back += n
        return self._decoded(rows)

    def _decoded(self, table: pa.Table) -> tuple[list[str], torch.Tensor, np.ndarray]:
        ids = table.column("ref_id").to_pylist()
        buf = np.array(self._rows_of(table.column("payload"), ids))  # own copy: a raw decode views it
        kept = table.column("n_tokens").to_numpy().astype(_KEPT)
        return ids, self._decode(buf, ids), kept


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
