"""The encode stage's unit of work: a range of references -> their sparse memories, coded.

An actor loads the model and the codec once and then encodes shard after shard. References are
sorted by length inside a shard so a batch pads little; the order is fixed, so a shard encoded
twice gives the same bytes (what makes a killed-and-resumed build equal an uninterrupted one).
The encoding itself (model/ref_batches.py) is batch-invariant, so a cold reference encoded at
serving (storage/memory_store.py) stores the same bytes as this stage would.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from model import load_model
from model.checkpoint import saved_hash
from model.codecs import make_codec
from model.ref_batches import encode_tokens
from pipelines.shard_actor import ShardActor
from storage.schemas import MEMORIES


class EncodeShards(ShardActor):
    """One model and codec per actor, many shards."""

    columns = ("ref_id", "content_hash", "token_ids")
    # lz4: a third of snappy's CPU to write and half to read back at the commit, files as
    # small (payloads are mostly dense int8 codes, zeros where a reference is short)
    compression = "lz4"

    def __init__(self, model_dir: str, codec: str, codec_kw: dict, batch_size: int, **shard):
        super().__init__(**shard)
        import faiss

        # faiss (the vq codec) brings its own OpenMP pool; left at every core it fights torch's.
        faiss.omp_set_num_threads(self.threads)
        self.model = load_model(model_dir)
        self.model_hash = saved_hash(model_dir)
        self.codec = make_codec(codec, **codec_kw)
        self.batch_size = batch_size

    def compute(self, refs: pa.Table) -> pa.Table:
        tokens = refs.column("token_ids").to_pylist()
        order = sorted(range(len(tokens)), key=lambda i: (len(tokens[i]), i))
        payloads, positions, kept = [], [], []
        for lo in range(0, len(order), self.batch_size):
            p, pos, k = encode_tokens(self.model, self.codec, [tokens[i] for i in order[lo : lo + self.batch_size]])
            payloads += p
            positions.append(pos.reshape(len(p), -1))
            kept.append(k)
        n, m = len(order), self.model.config
        flat = np.concatenate(positions) if n else np.empty((0, 0), np.int16)  # (n, L * H * k)
        shape = [m.n_mem_layers, 2, m.n_kv_heads, flat.shape[1] // (m.n_mem_layers * m.n_kv_heads), m.head_dim]
        take = pa.array(order, pa.int64())
        return pa.table(
            {
                "ref_id": refs.column("ref_id").take(take),
                "content_hash": refs.column("content_hash").take(take),
                "model_hash": pa.array([self.model_hash] * n, pa.string()),
                "codec": pa.array([self.codec.name] * n, pa.string()),
                "shape": pa.array([shape] * n, pa.list_(pa.int32())),
                "n_tokens": pa.array(np.concatenate(kept) if n else np.empty(0, np.int16), pa.int16()),
                # one list array over the (n, L * H * k) block: no per-row Python objects
                "positions": pa.ListArray.from_arrays(
                    np.arange(n + 1, dtype=np.int32) * flat.shape[1], pa.array(flat.reshape(-1), pa.int16())
                ),
                "payload": pa.array(payloads, pa.binary()),
            },
            schema=MEMORIES,
        )
