"""The shard actor's base: a step's `compute` on each row range, staged whole under the one name a
shard has, or not at all; and the driver's view of those names, old ones included."""

import lance
import pyarrow as pa
import pytest

from pipelines.shard_actor import ShardActor, staged_path
from storage.staging import read_table


class Doubled(ShardActor):
    columns = ("x",)

    def __init__(self, fail_at: int | None = None, **shard):
        super().__init__(**shard)
        self.fail_at = fail_at

    def compute(self, table: pa.Table) -> pa.Table:
        xs = table.column("x").to_pylist()
        if self.fail_at in xs:
            raise RuntimeError("killed mid-shard")
        return pa.table({"y": [2 * x for x in xs]})


@pytest.fixture
def source(tmp_path):
    lance.write_dataset(pa.table({"x": list(range(10)), "other": ["a"] * 10}), str(tmp_path / "in.lance"))
    return str(tmp_path / "in.lance")


def test_each_shard_of_a_batch_is_its_row_range_computed_and_staged(tmp_path, source):
    actor = Doubled(input_uri=source, stage_dir=str(tmp_path / "stage"), threads=1)
    out = actor({"shard": [3, 4], "start": [0, 6], "end": [6, 10]})
    assert out["shard"].tolist() == [3, 4] and out["rows"].tolist() == [6, 4]
    assert read_table(staged_path(tmp_path / "stage", 3)).column("y").to_pylist() == [0, 2, 4, 6, 8, 10]
    assert read_table(staged_path(tmp_path / "stage", 4)).column("y").to_pylist() == [12, 14, 16, 18]


def test_a_shard_that_fails_stages_nothing(tmp_path, source):
    actor = Doubled(fail_at=7, input_uri=source, stage_dir=str(tmp_path / "stage"), threads=1)
    with pytest.raises(RuntimeError):
        actor({"shard": [0, 1], "start": [0, 5], "end": [5, 10]})
    assert staged_path(tmp_path / "stage", 0).exists()
    assert not staged_path(tmp_path / "stage", 1).exists()
    assert [p.name for p in (tmp_path / "stage" / "shards").iterdir()] == ["000000.parquet"]  # no partial file


def test_a_shard_staged_under_its_stage_s_old_name_is_done_and_read_from_there(tmp_path):
    from jobs.stages.runner import pending, staged_file

    stage_dir = tmp_path / "stage"
    (stage_dir / "memories").mkdir(parents=True)
    (stage_dir / "memories" / "m000001.parquet").write_bytes(b"old")
    assert staged_file(stage_dir, "encode", 1) == stage_dir / "memories" / "m000001.parquet"
    assert staged_file(stage_dir, "encode", 0) == staged_path(stage_dir, 0)
    assert staged_file(stage_dir, "embed", 1) == staged_path(stage_dir, 1)  # another stage's old name is not its own
    shards = [(0, 0, 5), (1, 5, 10)]
    assert pending(shards, lambda s: staged_file(stage_dir, "encode", s[0])) == [(0, 0, 5)]
