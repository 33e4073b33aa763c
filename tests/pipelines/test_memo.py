"""The per-record memo's store (pipelines/memo.py) on a local bank and on an S3 bank: what a build
writes is found by the next build of the same config only, and publishing drops older builds."""

from __future__ import annotations

import json
import uuid

import pyarrow as pa
import pytest

from pipelines import memo
from storage.bank import Bank
from storage.layout import upath

SCHEMA = pa.schema([memo.KEY, pa.field("text", pa.large_string())])


@pytest.fixture(params=["local", "s3"])
def bank(request, tmp_path):
    if request.param == "local":
        return Bank(str(tmp_path / "bank"))
    return Bank(f"{request.getfixturevalue('s3')[0]}/memo-{uuid.uuid4().hex[:8]}")


def write_build(bank: Bank, build: str, shards: dict[str, list[str]], cfg: str = "cfg-a") -> None:
    for kind in memo.KINDS:
        for shard_id, texts in shards.items():
            memo.write(
                memo.target(bank, build, kind),
                shard_id,
                SCHEMA,
                {"key": [memo.text_key(t) for t in texts], "text": [f"{kind}:{t}" for t in texts]},
            )
    memo.publish(bank, build, {kind: cfg for kind in memo.KINDS}, list(shards))


def test_a_published_build_is_found_by_text_and_config(bank):
    assert memo.source(bank, "clean", "cfg-a") is None  # no memo yet
    write_build(bank, "b1", {"s0": ["alpha", "beta"], "s1": ["gamma", "alpha"]})
    src = memo.source(bank, "clean", "cfg-a")
    found = memo.lookup(src, [memo.text_key(t) for t in ("alpha", "gamma", "delta")], ["text"])
    assert {k: v["text"] for k, v in found.items()} == {
        memo.text_key("alpha"): "clean:alpha",
        memo.text_key("gamma"): "clean:gamma",
    }
    chunk = memo.lookup(memo.source(bank, "chunk", "cfg-a"), [memo.text_key("beta")], ["text"])
    assert [v["text"] for v in chunk.values()] == ["chunk:beta"]
    assert memo.source(bank, "clean", "cfg-b") is None  # written by another config: never read


def test_publishing_a_build_drops_the_older_ones(bank):
    write_build(bank, "b1", {"s0": ["alpha", "beta"]})
    memo.write(
        memo.target(bank, "b-crashed", "clean"),
        "s0",
        SCHEMA,  # a build that never committed
        {"key": [memo.text_key("zeta")], "text": ["clean:zeta"]},
    )
    write_build(bank, "b2", {"s0": ["beta", "gamma"], "s9": []}, cfg="cfg-b")
    root = bank.layout.memo()
    assert sorted(p.name for p in root.iterdir()) == ["b2", "current.json"]
    assert json.loads((root / "current.json").read_text())["build"] == "b2"
    assert memo.source(bank, "clean", "cfg-a") is None
    src = memo.source(bank, "clean", "cfg-b")
    found = memo.lookup(src, [memo.text_key(t) for t in ("alpha", "beta", "gamma", "zeta")], ["text"])
    assert sorted(v["text"] for v in found.values()) == ["clean:beta", "clean:gamma"]


def test_a_shard_without_a_memo_file_costs_hits_not_correctness(bank):
    memo.write(memo.target(bank, "b1", "clean"), "s0", SCHEMA, {"key": [memo.text_key("alpha")], "text": ["x"]})
    memo.publish(bank, "b1", {"clean": "c", "chunk": "c"}, ["s0", "s1"])  # s1 and the chunk memo: none
    assert len(memo.lookup(memo.source(bank, "clean", "c"), [memo.text_key("alpha")], ["text"])) == 1
    assert memo.lookup(memo.source(bank, "chunk", "c"), [memo.text_key("alpha")], ["text"]) == {}
    assert upath(memo.source(bank, "chunk", "c")).parent.name == "b1"
