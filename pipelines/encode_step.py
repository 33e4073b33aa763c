"""The encode stage's unit of work: a range of references -> their sparse memories, coded.

An actor loads the model and the codec once and then encodes shard after shard. References are
sorted by length inside a shard so a batch pads little; the order is fixed, so a shard encoded
twice gives the same bytes (what makes a killed-and-resumed build equal an uninterrupted one).
The encoding itself (model/ref_batches.py) is batch-invariant, so a cold reference encoded at
serving (storage/memory_store.py) stores the same bytes as this stage would.
"""

from __future__ import annotations

from upath import UPath

import numpy as np
import pyarrow as pa
import torch

from model import load_model
from model.checkpoint import saved_hash
from model.codecs import make_codec
from model.ref_batches import encode_tokens
from storage.layout import upath
from storage.schemas import MEMORIES
from storage.staging import write_atomic


def staged_path(stage_dir, shard: int) -> UPath:
    return upath(stage_dir) / "memories" / f"m{shard:06d}.parquet"


class EncodeShards:
    """Ray Data actor: one model and codec per process, many shards."""

    def __init__(self, model_dir: str, codec: str, codec_kw: dict, refs_uri: str, stage_dir: str,
                 batch_size: int, threads: int):
        torch.set_num_threads(threads)
        import faiss

        # faiss (the vq codec) brings its own OpenMP pool; left at every core it fights torch's.
        faiss.omp_set_num_threads(threads)
        self.model = load_model(model_dir)
        self.model_hash = saved_hash(model_dir)
        self.codec = make_codec(codec, **codec_kw)
        self.refs_uri, self.stage_dir, self.batch_size = refs_uri, stage_dir, batch_size

    def __call__(self, batch: dict) -> dict:
        done = [self.encode_shard(int(i), int(a), int(b)) for i, a, b in zip(batch["shard"], batch["start"], batch["end"])]
        return {"shard": np.array([d["shard"] for d in done]), "rows": np.array([d["rows"] for d in done])}

    def encode_shard(self, shard: int, start: int, end: int) -> dict:
        import lance

        refs = lance.dataset(self.refs_uri).to_table(columns=["ref_id", "content_hash", "token_ids"],
                                                     offset=start, limit=end - start)
        tokens = refs.column("token_ids").to_pylist()
        order = sorted(range(len(tokens)), key=lambda i: (len(tokens[i]), i))
        shape = None
        cols: dict[str, list] = {name: [] for name in MEMORIES.names}
        for lo in range(0, len(order), self.batch_size):
            idx = order[lo:lo + self.batch_size]
            payloads, positions, kept = encode_tokens(self.model, self.codec, [tokens[i] for i in idx])
            shape = shape or [self.model.config.n_mem_layers, 2, self.model.config.n_kv_heads,
                              positions.shape[-1], self.model.config.head_dim]
            for j, i in enumerate(idx):
                cols["ref_id"].append(refs.column("ref_id")[i].as_py())
                cols["content_hash"].append(refs.column("content_hash")[i].as_py())
                cols["positions"].append(positions[j].reshape(-1))
                cols["n_tokens"].append(int(kept[j]))
                cols["payload"].append(payloads[j])
        n = len(cols["ref_id"])
        cols["model_hash"] = [self.model_hash] * n
        cols["codec"] = [self.codec.name] * n
        cols["shape"] = [shape] * n
        write_atomic(staged_path(self.stage_dir, shard), pa.table(cols, schema=MEMORIES))
        return {"shard": shard, "rows": n}
