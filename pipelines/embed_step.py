"""The embed stage, one batch of references at a time: refs rows -> `embeddings` rows.

`EmbedRefs` is a callable class so Ray Data can run it in an actor pool and the model loads once
per actor, not once per batch:

    ds.map_batches(EmbedRefs, fn_constructor_args=(spec,), batch_size=256, batch_format="numpy",
                   compute=ray.data.ActorPoolStrategy(size=1), num_cpus=1)

On this 2-core machine give the actors fractional or few CPUs (measured on this machine: a pool that takes
every CPU starves the read task and Ray Data hangs). It is also an ordinary callable, which is how
the tests and `m3 search` (for the query text) use it without Ray.

The output `vector` column is a 2-D float32 ndarray (Ray Data's tensor column); `to_arrow()`
turns a batch into a RecordBatch of `EMBEDDINGS_SCHEMA(dim)` (vector as fixed_size_list, the
layout LanceDB indexes), whatever form Ray hands the batch back in. With `text=True` (a lexical
`retrieval.method`: storage/lexical.py) each row also carries its reference's text, which the
embed stage then indexes for full-text search.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from pipelines.embedder import DEFAULT_SPEC, load_embedder
from pipelines.shard_actor import ShardActor

# refs columns the stage reads; content_hash is passed through so a rebuild can skip references
# whose text has not changed since their vector was computed
INPUT_COLUMNS = ["ref_id", "text", "content_hash"]


def EMBEDDINGS_SCHEMA(dim: int, text: bool = False) -> pa.Schema:  # noqa: N802 - reads like the constants in schemas.py
    """Arrow schema of the `embeddings` table for vectors of `dim` float32; with `text`, the
    reference's text too (what the full-text index of bm25/hybrid retrieval reads)."""
    if int(dim) <= 0:
        raise ValueError(f"embedding dim must be positive, got {dim}")
    return pa.schema(
        [
            pa.field("ref_id", pa.string(), nullable=False),
            pa.field("embedder", pa.string(), nullable=False),  # Embedder.id: name@fingerprint
            pa.field("content_hash", pa.string(), nullable=False),  # of the ref it was computed from
            # fixed size: what LanceDB's vector search and ANN indexes require
            pa.field("vector", pa.list_(pa.float32(), int(dim)), nullable=False),
            *([pa.field("text", pa.string(), nullable=False)] if text else []),
        ]
    )


class EmbedRefs:
    """refs batch {ref_id, text, content_hash} -> {ref_id, embedder, content_hash, vector[, text]}."""

    def __init__(self, spec: str = DEFAULT_SPEC, batch_size: int = 64, text: bool = False):
        self.embedder = load_embedder(spec)
        self.batch_size = batch_size  # the model's forward batch, not Ray's batch
        self.dim, self.text = self.embedder.dim, text
        self.schema = EMBEDDINGS_SCHEMA(self.dim, text)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        missing = [c for c in INPUT_COLUMNS if c not in batch]
        if missing:
            raise KeyError(f"EmbedRefs needs refs columns {INPUT_COLUMNS}; batch lacks {missing}")
        texts = [str(t) for t in batch["text"]]
        vectors = self.embedder.embed(texts, batch_size=self.batch_size)
        n = len(texts)
        return {
            "ref_id": np.asarray(batch["ref_id"], dtype=object),
            "embedder": np.full(n, self.embedder.id, dtype=object),
            "content_hash": np.asarray(batch["content_hash"], dtype=object),
            "vector": vectors,  # (n, dim) float32, unit norm
            **({"text": np.asarray(texts, dtype=object)} if self.text else {}),
        }


def to_arrow(batch, dim: int, text: bool = False) -> pa.RecordBatch:
    """An EmbedRefs output as a RecordBatch of EMBEDDINGS_SCHEMA(dim, text), ready for `Bank.write`.

    Accepts the dict EmbedRefs returns, or what Ray hands back from `iter_batches`: a pyarrow
    Table whose vector column is Ray's tensor extension type (a plain cast to fixed_size_list
    fails), a numpy dict, or a pandas frame.
    """
    schema = EMBEDDINGS_SCHEMA(dim, text)
    if isinstance(batch, pa.RecordBatch):
        batch = pa.Table.from_batches([batch])
    if isinstance(batch, pa.Table):
        cols = {name: batch.column(name).combine_chunks() for name in schema.names}
    else:  # dict of arrays or pandas frame: both index by column name
        cols = {name: batch[name] for name in schema.names}
    vec = _matrix(cols["vector"], dim)
    strings = [pa.array(_to_list(cols[name]), type=pa.string()) for name in ("ref_id", "embedder", "content_hash")]
    flat = pa.array(np.ascontiguousarray(vec).reshape(-1), type=pa.float32())
    texts = [pa.array(_to_list(cols["text"]), type=pa.string())] if text else []
    return pa.RecordBatch.from_arrays([*strings, pa.FixedSizeListArray.from_arrays(flat, dim), *texts], schema=schema)


def _to_list(col) -> list:
    return col.to_pylist() if isinstance(col, pa.Array) else list(np.asarray(col, dtype=object))


def _matrix(vec, dim: int) -> np.ndarray:
    """Any form of the vector column as an (n, dim) float32 ndarray."""
    if isinstance(vec, pa.Array):
        if pa.types.is_fixed_size_list(vec.type) or pa.types.is_list(vec.type):
            vec = vec.flatten().to_numpy().reshape(len(vec), -1)  # flatten() honours slicing
        else:  # Ray's tensor extension array
            vec = vec.to_numpy()
    elif hasattr(vec, "to_numpy"):  # pandas Series
        vec = vec.to_numpy()
    arr = np.asarray(vec)
    if arr.dtype == object:  # a column of per-row arrays
        arr = np.stack([np.asarray(v, dtype=np.float32) for v in arr]) if len(arr) else arr.reshape(0, dim)
    arr = arr.astype(np.float32, copy=False)
    if arr.ndim != 2 or arr.shape[1] != dim:
        raise ValueError(f"vector column has shape {arr.shape}; expected (n, {dim})")
    return arr


class EmbedShards(ShardActor):
    """The embed stage's actor: one embedder per actor, many shards."""

    columns = tuple(INPUT_COLUMNS)

    def __init__(self, spec: str, batch_size: int, text: bool = False, **shard):
        super().__init__(**shard)
        self.embed = EmbedRefs(spec, batch_size, text)

    def compute(self, refs: pa.Table) -> pa.Table:
        out = self.embed({c: np.asarray(refs.column(c).to_pylist(), dtype=object) for c in INPUT_COLUMNS})
        return pa.Table.from_batches([to_arrow(out, self.embed.dim, self.embed.text)])
