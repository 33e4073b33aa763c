from pathlib import Path

import pytest

from model.errors import M3Error
from storage.layout import BankLayout, LayoutError


def test_tables_of_an_object_store_bank_keep_their_scheme():
    # Path("s3://b/bank") / "refs.lance" would be "s3:/b/bank/refs.lance"
    assert BankLayout("s3://b/bank").table("refs") == "s3://b/bank/refs.lance"
    assert BankLayout("gs://b/bank/").table("memories") == "gs://b/bank/memories.lance"


def test_a_local_bank_has_every_part_under_it(tmp_path):
    lay = BankLayout(str(tmp_path))
    assert lay.table("refs") == f"{tmp_path}/refs.lance"
    assert lay.staging("encode-k") == tmp_path / "_staging" / "encode-k"
    assert lay.training("continual") == tmp_path / "training" / "continual"
    assert lay.lock("rebuild") == tmp_path / "_rebuild.lock"
    assert lay.manifest() == tmp_path / "_live.json"
    parts = [lay.reports(), lay.runs(), lay.models(), lay.tokenizers(), lay.quantizers(), lay.eval(), lay.training()]
    assert all(p.parent == tmp_path for p in parts) and len({p.name for p in parts}) == len(parts)


def test_every_part_of_a_uri_bank_keeps_its_scheme():
    lay = BankLayout("s3://b/bank")
    assert str(lay.staging("ingest-1")) == "s3://b/bank/_staging/ingest-1"
    assert str(lay.staging("ingest-1") / "docs" / "s0.parquet") == "s3://b/bank/_staging/ingest-1/docs/s0.parquet"
    assert str(lay.manifest()) == "s3://b/bank/_live.json"
    assert [str(p) for p in (lay.tokenizers(), lay.quantizers(), lay.reports(), lay.eval())] == [
        "s3://b/bank/tokenizers",
        "s3://b/bank/quantizers",
        "s3://b/bank/_reports",
        "s3://b/bank/eval",
    ]
    assert lay.relative(lay.tokenizers() / "abc.json") == "tokenizers/abc.json"


def test_what_needs_a_local_directory_is_refused_for_an_object_store_by_name(tmp_path):
    with pytest.raises(LayoutError, match=r"training/continual of the bank at s3://b/bank needs a local directory"):
        BankLayout("s3://b/bank").training("continual")
    # the lock is an object there (a conditional PUT: jobs/ops/lock.py), a local file elsewhere
    assert str(BankLayout("s3://b/bank").lock("rebuild")) == "s3://b/bank/_rebuild.lock"
    assert BankLayout(f"file://{tmp_path}").lock("rebuild") == tmp_path / "_rebuild.lock"
    assert issubclass(LayoutError, M3Error)
    assert isinstance(BankLayout(Path("/tmp/x")).local("a"), Path)
    # a file:// bank is a local directory
    assert BankLayout(f"file://{tmp_path}").training("warmup") == tmp_path / "training" / "warmup"
