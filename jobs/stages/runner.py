"""The driver side every stage runs through: key -> up to date? -> staging -> shards left ->
workers -> commit -> tag -> clean up.

A row-range stage (embed, encode, pair) is a declaration (`ShardedStage`): the key its output is
a function of, the table and schema it writes, the input rows it shards, the shard actor that
turns a row range into a staged file (pipelines/shard_actor.py: the actor's side), and its
lineage. `run_stage` owns everything else, so those stages (and the rebuild, which calls the same
stages) resume, commit and tag the same way. Ingest, whose shards are corpus files and hash
partitions rather than row ranges, runs its phases on the same parts: `up_to_date`,
`staging_dir`, `pending`, `run_tasks` (its shards as Ray tasks) and `commit`.

A full build is an incremental build against an empty table. A stage derived from `refs`
(embeddings, memories) declares how its old rows are reused (`Reuse`): rows whose reference
still has the same content hash and whose producer (model; embedder) is the current one are
copied, the rest computed (pipelines/delta.py). Against no table every row is computed, read
straight from the input; against an old table the rows to compute are first written as a small
Lance dataset of their own (the "delta"), which the same actors read by row range, and the new
version is one update of the old one (`commit_shared`, storage/table_delta.py): the rows that
go get deletion vectors, the computed rows are appended, and every unchanged file is shared with
the builds before, so kept builds cost the rows they changed, not a copy each.

Reused rows may be checked on their way into the new version (`Reuse.check`): the encode stage
checks each memory it keeps against the crc32 the old version's payload slab holds for it
(jobs/stages/encode.py `checked_copy`), so a payload damaged on disk is not carried into a new
build under fresh checksums (a repaired row is rewritten, its damaged copy deleted).

Rows made outside the stage may be reused the same way (`ShardedStage.extra`: the memories a
server encoded for cold references and wrote back, storage/warm.py), and a stage may compute
nothing at all (`compute=False`: `encode.cold`), leaving the references it did not reuse without
a row.

Resumable: each shard's file appears whole (storage/staging.py) under a staging directory named
by the key and the old table's version, so a killed run redoes at most the shards in flight.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import lance
import numpy as np
import pyarrow as pa
from upath import UPath

from jobs.config import RayConfig
from jobs.faults import maybe_crash, maybe_pause
from jobs.progress import Progress
from jobs.runtime import init_ray, quiet_ray_data, row_shards, run_actor_shards
from jobs.stages.kept_rows import Reuse, commit_shared, copied, same_columns
from model.errors import M3Error
from pipelines.delta import Delta, plan_delta
from pipelines.shard_actor import staged_path
from storage.bank import LATEST, Bank
from storage.layout import upath
from storage.staging import iter_batches, remove, write_text_atomic


@dataclass
class ShardedStage:
    name: str  # staging prefix, tag prefix, crash point and progress label
    table: str  # the table it writes
    key_field: str  # the lineage field holding its key ("encode_key")
    key: str
    schema: pa.Schema
    input_uri: str  # the Lance dataset whose row ranges are the shards
    n_rows: int
    rows_per_shard: int
    actor: type  # a ShardActor: actor(input_uri=, stage_dir=, threads=, **actor_kw)
    actor_kw: dict
    actors: int
    threads: int
    lineage: Callable[[list[UPath]], dict]  # given the staged files, in shard order
    reuse: Reuse | None = None
    tag: bool = True
    # rows made elsewhere, reused like old rows (same ref_id, content hash and producer), read once
    extra: Callable[[], pa.Table | None] | None = None
    compute: bool = True  # False: rows not reused are not computed (left cold)


def up_to_date(bank: Bank, tables: tuple[str, ...] | list[str], key_field: str, key: str) -> bool:
    """Every one of `tables` exists and was made with this key: the stage has nothing to do."""
    return all(bank.has(t) and bank.metadata(t).get(key_field) == key for t in tables)


def staging_dir(bank: Bank, name: str, key: str, old_version: int | None = None) -> UPath:
    """Where a run of a stage stages its shards: by key, and by the table version it updates."""
    return bank.layout.staging(f"{name}-{key}" + (f"-from{old_version}" if old_version else ""))


def pending(shards: list, staged: Callable) -> list:
    """The shards whose staged file is not there yet (what a resumed run still has to do)."""
    return [s for s in shards if not upath(staged(s)).exists()]


# Each row-range stage named its staged files its own way before they shared one shard actor
# (pipelines/shard_actor.py). A job that code left half done resumes from what it staged: a shard
# staged under its stage's old name counts as done and is committed from there, not computed
# again. Only a staging directory made before that change can hold one; these can go once no
# bank holds a job started before it.
_OLD_NAMES = {"encode": "memories/m{:06d}.parquet", "embed": "e{:06d}.parquet", "pair": "p{:06d}.parquet"}


def staged_file(stage_dir: UPath, name: str, shard: int) -> UPath:
    """The file shard `shard` of stage `name` is (or will be) staged in."""
    path = staged_path(stage_dir, shard)
    if name in _OLD_NAMES and not path.exists():
        old = upath(stage_dir) / _OLD_NAMES[name].format(shard)
        if old.exists():
            return old
    return path


def run_tasks(name: str, items: list, fn: Callable[[Any], Any], note: Callable[[str], None] = print) -> list:
    """fn over items, one Ray task per item (1 CPU, spread over the nodes as Ray Data spreads),
    collecting results as they finish: the shards and partitions of ingest, each staging its own
    files. Plain tasks, not a Ray Data map: an item is already a whole shard or partition, and a
    Ray Data map would add, to a command whose work is seconds, its import, its stats and
    autoscaling actors (a worker process each) and its executor's start-up per dataset
    (BENCHMARKS.md, "Whole commands against their stages"). A task whose worker or node dies is
    retried by Ray, as Ray Data's tasks are."""
    if not items:
        return []
    import ray

    @ray.remote(num_cpus=1, scheduling_strategy="SPREAD")
    def task(i, item):
        maybe_pause(name, i)  # the node-death tests (jobs/faults.py)
        return fn(item)

    waiting = [task.remote(i, item) for i, item in enumerate(items)]
    results = []
    progress = Progress(name, len(items), unit="task(s)", out=note)
    while waiting:
        done, waiting = ray.wait(waiting, num_returns=1)
        results.append(ray.get(done[0]))
        progress.step()
        maybe_crash(name, len(results))
    return results


def commit(
    bank: Bank,
    tables: dict[str, tuple[pa.Schema, Callable[[], Iterator[pa.RecordBatch]]]],
    lineage: dict,
    key_field: str,
    crash: str | None = None,
    identity: dict[str, list[str]] | None = None,
) -> dict[str, int]:
    """One new version of each table, its rows streamed from `tables[name]` = (schema, batches);
    a table already committed with this key (`lineage[key_field]`) is kept, so a crash between
    two tables' commits neither loses nor doubles rows. Returns each table's version, written or
    found. An M3Error the rows raise is raised as itself: Lance's writer passes it on inside its
    own error, with a traceback in its text. `crash`: the crash point after each write.

    A table named in `identity` (its columns that say two rows are the same row) that exists with
    the same columns is updated, not rewritten: its rows already there stay in the files the
    builds before share (storage/table_delta.py); `batches` is then called twice."""
    versions = {}
    for name, (schema, batches) in tables.items():
        if bank.has(name) and bank.metadata(name).get(key_field) == lineage[key_field]:
            versions[name] = bank.table(name).version
            continue
        if bank.has(name) and (done := bank.finish_update(name, schema, lineage)) is not None:
            versions[name] = done  # killed between an update and its metadata
            continue
        refused: list[M3Error] = []

        def rows(batches=batches, refused=refused) -> Iterator[pa.RecordBatch]:
            try:
                yield from batches()
            except M3Error as e:
                refused.append(e)
                raise

        cols = (identity or {}).get(name)
        shared = cols and bank.has(name) and same_columns(bank.dataset(name, LATEST, check=False).schema, schema)
        try:
            if shared:
                versions[name] = bank.replace_rows(
                    name, schema, lambda batches=batches, refused=refused: rows(batches, refused), cols, lineage
                )
            else:
                versions[name] = bank.write(name, schema, rows(), lineage)
        except Exception:
            if refused:  # the one line the rows raised (nothing was committed)
                raise refused[0] from None
            raise
        if crash:
            maybe_crash(crash, 1)
    return versions


def run_stage(stage: ShardedStage, bank: Bank, ray: RayConfig, note: Callable[[str], None] = print) -> dict:
    """Bring `stage.table` up to date; returns status, version, counts and seconds."""
    t0 = time.time()
    if up_to_date(bank, [stage.table], stage.key_field, stage.key):
        note(f"{stage.name}: {stage.table} in {bank.uri} is up to date ({stage.key_field} {stage.key}); nothing to do")
        return {
            "status": "up_to_date",
            stage.key_field: stage.key,
            "version": bank.table(stage.table).version,
            "added": 0,
            "changed": 0,
            "removed": 0,
            "unchanged": stage.n_rows,
        }
    old = bank.dataset(stage.table) if stage.reuse is not None and bank.has(stage.table) else None
    extra = stage.extra() if stage.extra is not None else None
    extra = extra if extra is not None and extra.num_rows else None
    delta = _plan(stage, old, extra)
    cold = 0
    if delta is not None and not stage.compute:
        cold, delta = len(delta.compute_rows), _without_compute(delta)
    stage_dir = staging_dir(bank, stage.name, stage.key, old.version if old else None)
    input_uri = stage.input_uri
    prior = old is not None or extra is not None
    if prior and len(delta.compute_rows) < stage.n_rows:
        input_uri = _delta_input(
            lance.dataset(stage.input_uri), delta.compute_rows, list(stage.actor.columns), stage_dir / "delta.lance"
        )
    n = len(delta.compute_rows) if delta is not None else stage.n_rows
    shards = row_shards(n, stage.rows_per_shard)
    todo = pending(shards, lambda s: staged_file(stage_dir, stage.name, s[0]))
    counts = delta.counts() if delta is not None else {}
    note(
        f"{stage.name}: {n:,} of {stage.n_rows:,} row(s) to compute"
        + (f" ({_describe(counts)})" if prior else "")
        + (f", {cold:,} left cold" if cold else "")
        + f"; {len(shards) - len(todo)} of {len(shards)} shard(s) done"
    )
    kw = dict(stage.actor_kw, stage_dir=str(stage_dir), input_uri=input_uri)
    _run_shards(
        stage.name,
        ray,
        todo,
        stage.actor,
        in_process=prior and len(todo) == 1,
        actors=stage.actors,
        threads=stage.threads,
        **kw,
    )
    t_compute = time.time() - t0
    files = [staged_file(stage_dir, stage.name, i) for i, _, _ in shards]
    lineage = {**stage.lineage(files), stage.key_field: stage.key}
    if delta is not None:
        lineage["delta"] = counts
    if not stage.compute:
        lineage["cold_rows"] = cold

    if old is not None and stage.reuse.table_ok and delta.unchanged and same_columns(old.schema, stage.schema):
        version = commit_shared(
            bank, (stage.table, stage.schema, stage.reuse, stage.input_uri), old, extra, delta, files, lineage
        )
    else:

        def rows() -> Iterator[pa.RecordBatch]:
            if prior:
                yield from copied(old, extra, delta, stage.reuse, stage.schema, stage.input_uri)
            yield from iter_batches(files, columns=stage.schema.names)

        version = commit(bank, {stage.table: (stage.schema, rows)}, lineage, stage.key_field)[stage.table]
    if stage.tag:
        bank.tag(stage.table, f"{stage.name}-{stage.key}", version)
    remove(stage_dir)
    return {
        "status": "built",
        stage.key_field: stage.key,
        "version": version,
        "computed": n,
        "cold": cold,
        **(counts or {"added": n, "changed": 0, "removed": 0, "unchanged": 0}),
        "compute_seconds": round(t_compute, 3),
        "seconds": round(time.time() - t0, 3),
    }


def _describe(counts: dict) -> str:
    return ", ".join(f"{v:,} {k}" for k, v in counts.items())


def _plan(stage: ShardedStage, old: lance.LanceDataset | None, extra: pa.Table | None = None) -> Delta | None:
    if stage.reuse is None:
        return None
    refs = lance.dataset(stage.input_uri).to_table(columns=["ref_id", "content_hash"])
    if old is None and extra is None:
        return plan_delta(refs, None)
    r = stage.reuse
    cols = ["ref_id", "content_hash", r.producer_column]
    parts = ([old.to_table(columns=cols)] if old is not None else []) + (
        [extra.select(cols)] if extra is not None else []
    )
    old_cols = pa.concat_tables([p.cast(parts[0].schema) for p in parts])
    producer = old_cols.column(r.producer_column).to_numpy(zero_copy_only=False)
    ok = producer == r.producer
    if not r.table_ok:  # a table-level mismatch (another quantizer, another sparsity) reuses no old row
        ok[: old.count_rows() if old is not None else 0] = False  # (extra rows are made for this table)
    return plan_delta(refs, old_cols, pa.array(ok, pa.bool_()))


def _delta_input(refs: lance.LanceDataset, rows, columns: list[str], path: UPath) -> str:
    """The references to compute, as their own small Lance dataset (what the actors read by row
    range). A marker written after it says it is whole (an object store has no directory
    rename); a dataset without one is a crashed attempt, written again."""
    if len(rows) == 0:
        return ""  # nothing to compute: no dataset, no shards
    done = path.with_name(path.name + ".done")
    if done.exists():
        return str(path)
    schema = pa.schema([refs.schema.field(c) for c in columns])

    def batches():
        for lo in range(0, len(rows), 4096):
            for batch in refs.take(rows[lo : lo + 4096], columns=columns).to_batches():
                yield pa.RecordBatch.from_arrays(batch.columns, schema=schema)  # drops the table's metadata

    lance.write_dataset(pa.RecordBatchReader.from_batches(schema, batches()), str(path), mode="overwrite")
    write_text_atomic(done, str(len(rows)))
    return str(path)


def _without_compute(delta: Delta) -> Delta:
    """The same plan with nothing computed: the rows it would compute stay without a row."""
    return Delta(np.array([], dtype=np.int64), delta.keep_ids, delta.added, delta.changed, delta.removed)


def _run_shards(
    name: str, ray: RayConfig, todo: list, actor_cls, *, in_process: bool, actors: int, threads: int, **kw
) -> None:
    """The shards through a Ray Data actor pool, or, for a one-shard update, through the same
    class called here: for the few references a small corpus change leaves, starting an actor
    pool (a process importing torch and loading the model) costs more than the work. Same code,
    same staged files, same bytes either way."""
    if not todo:
        return
    if in_process:
        ((i, a, b),) = todo
        actor_cls(threads=threads, **kw)({"shard": [i], "start": [a], "end": [b]})
        maybe_crash(name, 1)
        return
    init_ray(ray)
    quiet_ray_data()
    run_actor_shards(name, todo, actor_cls, actors=actors, threads=threads, **kw)
