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
    assert lay.trained_model("continual") == tmp_path / "training" / "continual" / "model"
    assert lay.lock("rebuild") == tmp_path / "_rebuild.lock"
    assert lay.manifest() == tmp_path / "_live.json"
    parts = [lay.reports(), lay.runs(), lay.models(), lay.tokenizers(), lay.quantizers(), lay.eval(), lay.training()]
    assert all(p.parent == tmp_path for p in parts) and len({p.name for p in parts}) == len(parts)


def test_what_needs_a_local_directory_is_refused_for_a_uri_by_name():
    with pytest.raises(LayoutError, match=r"_staging/ingest-1 of the bank at s3://b/bank needs a local directory"):
        BankLayout("s3://b/bank").staging("ingest-1")
    assert issubclass(LayoutError, M3Error)
    assert isinstance(BankLayout(Path("/tmp/x")).local("a"), Path)
