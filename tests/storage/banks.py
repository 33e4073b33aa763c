"""Tiny hand-made banks of refs and memories, published build by build (no Ray, no model)."""

from __future__ import annotations

import pyarrow as pa

from storage.bank import Bank
from storage.live import publish
from storage.schemas import MEMORIES, REFS


def refs(rows: dict[str, str]) -> pa.Table:
    """ref_id -> content_hash."""
    ids = sorted(rows)
    return pa.table(
        {
            "ref_id": ids,
            "doc_id": [i.split("-")[0] for i in ids],
            "ordinal": [0] * len(ids),
            "start_token": [0] * len(ids),
            "n_tokens": [3] * len(ids),
            "text": [f"text of {i}" for i in ids],
            "token_ids": [[1, 2, 3]] * len(ids),
            "content_hash": [rows[i] for i in ids],
        },
        schema=REFS,
    )


def memories(rows: dict[str, tuple[str, bytes]]) -> pa.Table:
    """ref_id -> (model_hash, payload)."""
    ids = sorted(rows)
    return pa.table(
        {
            "ref_id": ids,
            "content_hash": ["h"] * len(ids),
            "model_hash": [rows[i][0] for i in ids],
            "codec": ["raw-fp32"] * len(ids),
            "shape": [[1, 2, 1, 1, 1]] * len(ids),
            "n_tokens": [1] * len(ids),
            "positions": [[0]] * len(ids),
            "payload": [rows[i][1] for i in ids],
        },
        schema=MEMORIES,
    )


def publish_build(bank: Bank, ref_rows: dict, mem_rows: dict, key: str) -> dict:
    versions = {
        "refs": bank.write("refs", REFS, refs(ref_rows).to_batches(), {"ingest_key": key}),
        "memories": bank.write(
            "memories",
            MEMORIES,
            memories(mem_rows).to_batches(),
            {
                "encode_key": key,
                "model_hash": "m1" * 8,
                "codec": "raw-fp32",
                "quantizer_hash": None,
                "config": {"model": {"n_layers": 2, "n_heads": 2, "ref_max_tokens": 4, "head_dim": 2}},
            },
        ),
    }
    return publish(bank, versions, {"ingest_key": f"ingest-{key}", "encode_key": f"encode-{key}"})


# build 1 -> build 2: refs d1-0 unchanged, d2-0 changed, d3-0 removed, d6-0 and d7-0 added;
# memories d2-0 (new payload) and d4-0 (new model) changed, d3-0 removed, d6-0 and d7-0 new
B1_REFS = {"d1-0": "a", "d2-0": "b", "d3-0": "c", "d4-0": "d", "d5-0": "e"}
B1_MEM = {r: ("m1", f"p-{r}".encode()) for r in B1_REFS}
B2_REFS = {"d1-0": "a", "d2-0": "B", "d4-0": "d", "d5-0": "e", "d6-0": "f", "d7-0": "g"}
B2_MEM = {
    **{r: B1_MEM[r] for r in ("d1-0", "d5-0")},
    "d2-0": ("m1", b"p-d2-0 new"),
    "d4-0": ("m2", b"p-d4-0"),
    "d6-0": ("m1", b"p-d6-0"),
    "d7-0": ("m1", b"p-d7-0"),
}


def two_builds(path) -> Bank:
    bank = Bank(str(path))
    publish_build(bank, B1_REFS, B1_MEM, "one")
    publish_build(bank, B2_REFS, B2_MEM, "two")
    return bank
