"""`m3 rebuild`: bring the whole bank up to date with the corpus and the model, then publish it.

    python -m jobs rebuild -c configs/demo.yaml

1. lock      the bank's write lock (jobs/ops/lock.py), the one every writer takes: a second
             rebuild, an `m3 ingest` or any other writer fails at once, naming the holder;
2. ingest    the corpus -> documents, rejects, refs, train_sequences (nothing to do when neither
             corpus nor config changed); the live build's tokenizer is reused, so an unchanged
             document keeps its token ids and therefore its references' content hashes;
3. memories  the encode stage against the previous table (jobs/stages/runner.py): new and
             changed references encoded, removed ones dropped, unchanged ones copied; a new
             model re-encodes everything;
4. embeddings the embed stage, the same way, by text (rebuild.embeddings);
5. publish   through the one publish policy (jobs/ops/publish.py, shared with `m3 run`): the
             versions steps 2-4 wrote or found up to date, never the latest (a write by anyone
             else meanwhile is not published; memories or embeddings of another refs version
             are refused); a build with 0 references, or with fewer than
             (1 - rebuild.max_shrink) of the live build's, is refused unless --allow-shrink
             (exit 2: nothing published, no retention). The `live` manifest names the new
             version of every table in one atomic write (a rename, or one PUT on an object
             store), then each table's `live` tag moves (storage/live.py). Readers that follow
             `live` (m3 sql, MemoryStore, Bank(uri, live=True)) never see a build that did not
             finish. The write happens only if the manifest is still the one read at step 1
             (If-Match on S3): of two rebuilds that both think they hold the lock (one taken
             over as stale), the second to publish fails with PublishConflict instead of
             replacing the first one's build;
6. retain    versions older than the newest `rebuild.keep_builds` published builds are deleted;
7. compact   with rebuild.compact_after, `m3 bank compact` under the same lock (jobs/ops/compact.py).

The same on a bank at an s3:// URI: the lock is a conditional PUT there (jobs/ops/lock.py), the
stages and the manifest write through the bucket (tests/jobs/ops/test_rebuild_s3.py).

A rebuild killed anywhere before 5 leaves the live build untouched; run it again and it resumes
(each stage keeps its finished shards or its committed table). Nothing changed -> every step
says so and no version is written.
"""

from __future__ import annotations

import dataclasses
import time

from jobs.config import Config
from jobs.ops.compact import compact_locked
from jobs.ops.lock import write_lock
from jobs.ops.publish import built_from, publish_build, stage_versions
from jobs.stages.encode import memories_slab
from storage.bank import Bank
from storage.live import TAG, live_versions, manifest_state
from storage.retention import compact

# fragments of a table a rebuild leaves before it merges them (one rewrite per ~16 rebuilds): an
# incremental rebuild adds one to each table it updates and shares the others with the builds
# before (storage/table_delta.py); merging rewrites them, so they are merged only once they pile
# up (a take touches every fragment it reads from); embeddings' are merged by `m3 bank compact`
MAX_FRAGMENTS = 16


def merge_piled(bank: Bank, table: str) -> int | None:
    """The version merging `table`'s fragments made, if more than MAX_FRAGMENTS had piled up."""
    return compact(bank.dataset(table).uri, min_fragments=MAX_FRAGMENTS + 1)


def pin_tokenizer(cfg: Config) -> Config:
    """The config to ingest with: unchanged if it is up to date as it stands (so a rebuild of an
    unchanged corpus is a no-op whatever built the bank), else with tokenizer.path set to the
    live build's tokenizer, so the BPE is not retrained on the changed corpus."""
    from jobs.stages.ingest import plan, up_to_date

    if not cfg.rebuild.pin_tokenizer or cfg.tokenizer.path:
        return cfg
    bank = Bank.of(cfg, live=True)
    if not bank.has("refs") or up_to_date(Bank.of(cfg), plan(cfg)[3]):
        return cfg
    rel = bank.metadata("refs").get("tokenizer_path")
    path = bank.layout.path(rel) if rel else None
    if path is None or not path.exists():
        return cfg
    return dataclasses.replace(cfg, tokenizer=dataclasses.replace(cfg.tokenizer, path=str(path)))


def run_rebuild(cfg: Config, allow_shrink: bool = False) -> dict:
    from jobs.stages.embed import run_embed
    from jobs.stages.encode import run_encode
    from jobs.stages.ingest import run_ingest

    t0 = time.time()
    notes = []
    timings: dict[str, float] = {}

    def lap(name: str) -> None:  # seconds spent in each step, for the report and bench/rebuild.py
        timings[name] = round(time.time() - t0 - sum(timings.values()), 3)

    def note(text: str) -> None:
        notes.append(text)
        print(f"[rebuild] {text}", flush=True)

    with write_lock(cfg, "rebuild"):  # reentrant: the stages below take it too
        bank = Bank.of(cfg)
        before, token = manifest_state(bank)  # what this build is built on, and publishes over
        before = dict(before["versions"]) if before else {}
        cfg = pin_tokenizer(cfg)
        if cfg.tokenizer.path:
            note(f"tokenizer: {cfg.tokenizer.path}")
        lap("lock")
        ingest = run_ingest(cfg)
        if ingest.get("status") != "up_to_date":  # ingest's tables gain a fragment a rebuild too
            for table in ("documents", "refs"):
                if (v := merge_piled(bank, table)) is not None:
                    ingest["versions"][table] = v
        lap("ingest")
        # the same stages as `m3 encode` / `m3 embed`: against the previous table they compute
        # only new and changed references and copy the rest
        memories = run_encode(cfg, label="rebuild", note=note)
        lap("memories")
        embeddings = run_embed(cfg, label="rebuild", note=note) if cfg.rebuild.embeddings else None
        if embeddings and isinstance(embeddings.get("index"), dict):
            index = embeddings["index"]
            embeddings["index"] = index.get("index")
            if index.get("update"):  # incremental (a delta over the new rows) or full
                embeddings["index_update"] = {k: index.get(k) for k in ("update", "indexed_rows", "reason")}
        lap("embeddings")
        if (v := merge_piled(bank, "memories")) is not None:
            memories["version"] = v
            memories["slab"] = memories_slab(bank, v, note)  # the served version's, not the one before
        # exactly what the stages wrote or found up to date, never the latest (jobs/ops/publish.py)
        results = {"ingest": ingest, "encode": memories, "embed": embeddings}
        versions = stage_versions(results, embeddings=bool(embeddings))
        changed = versions != before
        published = publish_build(
            bank, cfg, versions, token, allow_shrink=allow_shrink, what="rebuild", built_from=built_from(results)
        )
        retention = published["retention"]
        lap("publish")
        compaction = compact_locked(cfg, bank) if cfg.rebuild.compact_after else None
        if compaction:
            versions = live_versions(bank)
            lap("compact")
        if not changed:  # under the lock: no writer can change what "nothing to do" is said of
            from jobs.ops.verify import require_intact  # the cheap part of `m3 bank verify`: a damaged

            require_intact(bank)  # bank is one line naming the file, not "up to date"
    counts = {k: memories[k] for k in ("added", "changed", "removed")}
    summary = {
        "status": "published" if changed else "up_to_date",
        **counts,
        "versions": versions,
        "tag": TAG,
        "ingest": ingest.get("status", "built"),
        "memories": memories,
        "embeddings": embeddings,
        "retention": retention,
        "compaction": compaction,
        "timings": timings,
        "seconds": round(time.time() - t0, 3),
    }
    if changed:
        print(
            f"rebuild: published build {versions} as `{TAG}` in {summary['seconds']:.1f} s "
            f"(references added {counts['added']}, changed {counts['changed']}, removed {counts['removed']})"
        )
    else:
        print(f"rebuild: the live build of {cfg.bank.uri} is up to date; nothing to do")
    return summary
