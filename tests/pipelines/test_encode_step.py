"""The encode stage's unit of work: a shard of references -> one staged file of memories, sorted
by length, each row what the shared encoding routine gives that reference alone."""

import lance
import numpy as np
import pyarrow as pa
import torch

from model import Memory3, ModelConfig, save_model
from model.codecs import make_codec
from model.ref_batches import encode_tokens
from pipelines.encode_step import EncodeShards
from pipelines.shard_actor import staged_path
from storage.schemas import MEMORIES
from storage.staging import read_table


def test_a_shard_is_staged_sorted_by_length_with_each_reference_as_encoded_alone(tmp_path):
    cfg = ModelConfig.from_preset("tiny", mem_top_k=4)
    torch.manual_seed(0)
    save_model(Memory3(cfg), tmp_path / "model")
    rng = np.random.default_rng(0)
    lengths = [9, 3, 30, 1, 17, 9, 12]
    tokens = [rng.permutation(np.arange(4, cfg.vocab_size))[:n].tolist() for n in lengths]
    refs = pa.table(
        {
            "ref_id": [f"r{i}" for i in range(len(tokens))],
            "content_hash": [f"h{i}" for i in range(len(tokens))],
            "token_ids": pa.array(tokens, pa.list_(pa.int32())),
        }
    )
    lance.write_dataset(refs, str(tmp_path / "refs.lance"))
    actor = EncodeShards(
        str(tmp_path / "model"),
        "int8",
        {},
        batch_size=3,
        input_uri=str(tmp_path / "refs.lance"),
        stage_dir=str(tmp_path / "stage"),
        threads=1,
    )
    assert actor.run_shard(5, 1, 7) == {"shard": 5, "rows": 6}  # rows 1..6
    got = read_table(staged_path(tmp_path / "stage", 5))
    assert got.schema.equals(MEMORIES)
    want_order = sorted(range(1, 7), key=lambda i: (lengths[i], i))
    assert got.column("ref_id").to_pylist() == [f"r{i}" for i in want_order]
    assert got.column("content_hash").to_pylist() == [f"h{i}" for i in want_order]
    assert set(got.column("codec").to_pylist()) == {"int8"}
    assert got.column("shape").to_pylist() == [[cfg.n_mem_layers, 2, cfg.n_kv_heads, 4, cfg.head_dim]] * 6
    for row, i in enumerate(want_order):  # batch-invariant: the same as encoded alone
        payloads, positions, kept = encode_tokens(actor.model, make_codec("int8"), [tokens[i]])
        assert got.column("payload")[row].as_py() == payloads[0]
        assert got.column("positions")[row].as_py() == positions[0].reshape(-1).tolist()
        assert got.column("n_tokens")[row].as_py() == int(kept[0]) == min(lengths[i], 4)


def test_an_empty_shard_stages_an_empty_file(tmp_path):
    cfg = ModelConfig.from_preset("tiny")
    save_model(Memory3(cfg), tmp_path / "model")
    refs = pa.table({"ref_id": ["a"], "content_hash": ["h"], "token_ids": pa.array([[5, 6]], pa.list_(pa.int32()))})
    lance.write_dataset(refs, str(tmp_path / "refs.lance"))
    actor = EncodeShards(
        str(tmp_path / "model"),
        "int8",
        {},
        batch_size=3,
        input_uri=str(tmp_path / "refs.lance"),
        stage_dir=str(tmp_path / "stage"),
        threads=1,
    )
    assert actor.run_shard(0, 1, 1)["rows"] == 0
    got = read_table(staged_path(tmp_path / "stage", 0))
    assert got.num_rows == 0 and got.schema.equals(MEMORIES)
