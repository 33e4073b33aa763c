"""The one shard actor of the sharded stages (embed, encode, pair): a Ray Data callable class that
turns a row range of a Lance dataset into one staged file.

The base owns everything but the step's work: the torch threads the actor may use, the loop over
the shards Ray hands it, the row-range read of the input and the staged write, whole or not at
all (storage/staging.py), under the one name a shard's file has (`staged_path`). So a killed job
resumes from the files that exist, whatever the step. A step declares the input columns it reads
(`columns`), loads what it needs once per actor in its `__init__`, and implements `compute`: the
table of a shard's input rows -> the table of its output rows.

The driver side (jobs/stages/runner.py) plans the shards, hands the pending ones to a pool of
these (or, for one shard, calls one in process: same code, same bytes) and commits the files.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from upath import UPath

from storage.layout import upath
from storage.staging import open_atomic


def staged_path(stage_dir, shard: int) -> UPath:
    """The file shard `shard` of a stage is staged in."""
    return upath(stage_dir) / "shards" / f"{shard:06d}.parquet"


class ShardActor:
    """Ray Data actor: `__call__` takes a batch of {shard, start, end} and stages each shard."""

    columns: tuple[str, ...] = ()  # what a shard reads of its input
    compression = "snappy"  # of the staged parquet (pyarrow's default)

    def __init__(self, *, input_uri: str, stage_dir: str, threads: int):
        import torch

        # each actor gets `threads` CPUs from Ray; left at every core, actors fight over them
        torch.set_num_threads(threads)
        self.threads, self.input_uri, self.stage_dir = threads, input_uri, stage_dir
        self._input = None

    def compute(self, table: pa.Table) -> pa.Table:
        """A shard's input rows (`columns`, in table order) -> the rows staged for it."""
        raise NotImplementedError

    def __call__(self, batch: dict) -> dict:
        done = [self.run_shard(int(i), int(a), int(b)) for i, a, b in zip(batch["shard"], batch["start"], batch["end"])]
        return {"shard": np.array([d["shard"] for d in done]), "rows": np.array([d["rows"] for d in done])}

    def run_shard(self, shard: int, start: int, end: int) -> dict:
        out = self.compute(self.read(start, end))
        with open_atomic(staged_path(self.stage_dir, shard)) as f:
            pq.write_table(out, f, compression=self.compression)
        return {"shard": shard, "rows": out.num_rows}

    def read(self, start: int, end: int) -> pa.Table:
        if self._input is None:  # opened once per actor: the input does not change under a job
            import lance

            self._input = lance.dataset(self.input_uri)
        return self._input.to_table(columns=list(self.columns), offset=start, limit=end - start)
