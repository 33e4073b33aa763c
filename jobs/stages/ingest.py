"""`m3 ingest`: raw corpus -> documents, rejects, refs, train_sequences (LanceDB tables).

    python -m jobs ingest -c configs/demo.yaml [--set key=value ...]

Stages, each resumable (per-shard or per-partition files under <bank>/_staging/ingest-<key>/):
  1. clean    (Ray tasks, per shard)      read, normalize, quality filters, dedup keys
  2. dedup    (Ray tasks, per partition)  group equal keys -> duplicates; one vectorized merge
  3. tokenize (driver, Rust threads)      train the BPE on the kept documents, or load one
  4. chunk    (Ray tasks, per shard)      references and packed training sequences
  5. commit   (driver, streaming)         one new version of each table, lineage in its metadata

Every phase runs on the stage runner's parts (jobs/stages/runner.py): the staging directory,
the shards left, the Ray tasks and the commit the sharded stages use.

The key covers the config (the role of each source, corpus.roles, with it) and the bytes of
every input file: the same key means the same result, so a finished key is skipped ("nothing to
do") and an unfinished one resumes.

Incremental: clean and chunk keep a per-record memo in the bank (pipelines/memo.py, keyed by
the record's text and by every setting that work depends on), so a rebuild after a small edit
re-reads the whole corpus but normalizes, filters, MinHashes, tokenizes and cuts only the
records whose text changed. Dedup decisions, packing and row ids are made anew every build, and
so is applying each source's role to the memoized filter decisions: a changed role re-decides.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from upath import UPath

from jobs.config import Config, chunking_key, config_hash
from jobs.faults import maybe_kill_worker
from jobs.runtime import init_ray
from jobs.stages.report import Report
from jobs.stages.runner import commit as commit_tables
from jobs.stages.runner import pending, run_tasks, staging_dir
from jobs.stages.runner import up_to_date as stage_current
from pipelines import assemble, memo, readers
from pipelines.chunk_step import chunk_shard, seqs_path
from pipelines.clean_step import clean_shard, docs_path
from pipelines.dedup_step import dedup_partition, partition_output, resolve
from pipelines.tokenizer import check_model_ids, check_special_tokens, from_json, tokenizer_hash, train_bpe
from pipelines.tokenizer import load as load_tokenizer
from storage.bank import Bank
from storage.lock import writes_bank
from storage.schemas import DOCUMENTS, IDENTITY, REFS, SCHEMA_VERSION, TRAIN_SEQUENCES
from storage.staging import iter_batches, remove, write_text_atomic

TABLES = ("documents", "rejects", "refs", "train_sequences")


def plan(cfg: Config):
    """Everything decided before Ray starts: input files, their versions, shards and the key."""
    files = readers.expand_paths(cfg.corpus.paths, cfg.corpus.format, cfg.corpus.roles)  # each with its role
    readers.check_parquet_columns(files, cfg.corpus.text_key)
    counted = [readers.count_records(f, cfg.corpus.max_record_bytes) for f in files]
    counts = [n for n, _ in counted]
    corpus_version = hashlib.blake2b(
        json.dumps([[Path(f.path).name, h] for f, (_, h) in zip(files, counted)]).encode(), digest_size=8
    ).hexdigest()
    key = config_hash(
        {
            "corpus": cfg.corpus,
            "quality": cfg.quality,
            "bank_quality": cfg.bank_quality,
            "dedup": cfg.dedup,
            "tokenizer": cfg.tokenizer,
            "chunking": chunking_key(cfg.chunking),
            "corpus_version": corpus_version,
            "schema": SCHEMA_VERSION,
        }
    )
    shards = readers.plan_shards(files, counts, cfg.corpus.records_per_shard)
    return files, counts, corpus_version, key, shards


def up_to_date(bank: Bank, key: str) -> bool:
    return stage_current(bank, TABLES, "ingest_key", key)


def memo_keys(cfg: Config, tokenizer_hash: str | None = None) -> dict[str, str]:
    """What the memoized work of each step depends on besides the record's text: the memo of a
    build with other values is never read. The clean step's does not include dedup.partitions
    (where a key is grouped, not what it is); the chunk step's is the tokenizer's hash, not
    its path, so a pinned tokenizer reuses the memo of the build that trained it."""
    dedup = {"exact": cfg.dedup.exact, "near": cfg.dedup.near, "minhash": cfg.dedup.minhash}
    keys = {
        "clean": config_hash(
            {
                "quality": cfg.quality,
                "bank_quality": cfg.bank_quality,
                "dedup": dedup,
                "code": memo.CODE,
                "schema": SCHEMA_VERSION,
            }
        )
    }
    if tokenizer_hash is not None:
        keys["chunk"] = config_hash(
            {
                "tokenizer": tokenizer_hash,
                "chunking": chunking_key(cfg.chunking, packing=False),
                "code": memo.CODE,
                "schema": SCHEMA_VERSION,
            }
        )
    return keys


def _memo_hits(stage: str, results: list[dict], report: Report) -> None:
    hits = sum(r.get("memo_hits", 0) for r in results)
    report.set(**{f"memo_{stage}_hits": hits})
    if results:
        report.note(f"{stage}: {hits:,} record(s) taken from the memo")


def clean_and_dedup(cfg: Config, bank: Bank, files, shards, stage_dir: UPath, report: Report, key: str):
    """Stages 1-2: the per-document work, then the dedup decisions (sorted ranks, twins, kinds)."""
    with report.stage("clean"):
        todo = pending(shards, lambda s: docs_path(stage_dir, s.shard_id))
        report.note(f"clean: {len(shards) - len(todo)} of {len(shards)} shard(s) already done")
        src = memo.source(bank, "clean", memo_keys(cfg)["clean"])
        dst = memo.target(bank, key, "clean")

        def clean(shard):
            maybe_kill_worker(f"clean-{shard.shard_id}")
            return clean_shard(
                shard,
                files,
                cfg.corpus,
                cfg.quality,
                cfg.dedup,
                stage_dir,
                cfg.bank_quality,
                memo_src=src,
                memo_dst=dst,
            )

        _memo_hits("clean", run_tasks("clean", todo, clean, report.note), report)

    with report.stage("dedup"):
        parts = pending(list(range(cfg.dedup.partitions)), lambda p: partition_output(stage_dir, p))
        run_tasks("dedup", parts, lambda p: {"rows": dedup_partition(p, stage_dir)}, report.note)
        return resolve(stage_dir, cfg.dedup.partitions)


def refuse_without_documents(cfg: Config, stage_dir: UPath, shard_ids: list[str], records: int) -> None:
    """A corpus of which not one record became a document (empty files, every record rejected)
    makes no bank: committed, its empty tables would replace the bank's and every later stage
    would fail on them. Refused after the clean step, which decides it, with nothing committed
    and this build's staged files removed; the reasons come from the rejects it staged."""
    if any(batch.num_rows for batch in iter_batches(assemble.staged(stage_dir, "docs", shard_ids), columns=["rank"])):
        return
    reasons = assemble.reason_counts(iter_batches(assemble.staged(stage_dir, "rejects", shard_ids), columns=["reason"]))
    remove(stage_dir)
    why = ", ".join(f"{reason} {n:,}" for reason, n in reasons.items())
    raise readers.InputError(
        f"the corpus at {', '.join(cfg.corpus.paths)} yielded 0 documents: its {records:,} "
        f"record(s) were all rejected ({why}); nothing written"
    )


def tokenizer_for(
    cfg: Config, bank: Bank, stage_dir: UPath, shard_ids: list[str], dup_ranks, report: Report
) -> tuple[str, UPath]:
    """Stage 3: train (or load) the tokenizer once; returns its JSON and its path in the bank."""
    with report.stage("tokenize"):
        tok_file = stage_dir / "tokenizer.json"
        if not tok_file.exists():
            if cfg.tokenizer.path:
                tok = check_model_ids(load_tokenizer(cfg.tokenizer.path), cfg.model, cfg.tokenizer.path)
            else:
                texts = assemble.kept_texts(stage_dir, shard_ids, dup_ranks)
                tok = check_special_tokens(
                    train_bpe(texts, cfg.tokenizer.vocab_size, cfg.tokenizer.min_frequency), "trained tokenizer"
                )
            write_text_atomic(tok_file, tok.to_str())
        tok_json = tok_file.read_text(encoding="utf-8")
        # Later stages find the tokenizer by its hash, next to the tables it produced.
        bank_tok = bank.layout.tokenizers() / f"{tokenizer_hash(from_json(tok_json))}.json"
        if not bank_tok.exists():
            write_text_atomic(bank_tok, tok_json)
        return tok_json, bank_tok


def commit(bank: Bank, stage_dir: UPath, shard_ids: list[str], dedup, lineage: dict, report: Report) -> dict[str, int]:
    """Stage 5: one new version per table, through the runner's commit (a table already
    committed for this key is kept). Returns the version of each table, written or found
    committed (what a rebuild publishes)."""
    dup_ranks, twins, kinds = dedup
    with report.stage("commit"):
        dup_table = assemble.duplicate_rejects(stage_dir, shard_ids, dup_ranks, twins, kinds)
        streams = {
            "documents": (DOCUMENTS, lambda: assemble.kept_documents(stage_dir, shard_ids, dup_ranks)),
            "rejects": (dup_table.schema, lambda: assemble.all_rejects(stage_dir, shard_ids, dup_table)),
            "refs": (REFS, lambda: iter_batches(assemble.staged(stage_dir, "refs", shard_ids))),
            "train_sequences": (TRAIN_SEQUENCES, lambda: iter_batches(assemble.staged(stage_dir, "seqs", shard_ids))),
        }
        return commit_tables(bank, streams, lineage, "ingest_key", crash="commit", identity=IDENTITY)


@writes_bank("ingest")  # the bank's write lock (storage/lock.py), reentrant under m3 run / rebuild
def run_ingest(cfg: Config) -> dict:
    report = Report("ingest")
    files, counts, corpus_version, key, shards = plan(cfg)
    bank = Bank.of(cfg)
    if up_to_date(bank, key):
        print(
            f"ingest: tables in {bank.uri} are up to date for this corpus and config (ingest key {key}); nothing to do"
        )
        return {"status": "up_to_date", "ingest_key": key, "versions": {t: bank.table(t).version for t in TABLES}}
    stage_dir = staging_dir(bank, "ingest", key)
    shard_ids = [s.shard_id for s in shards]
    report.set(
        records_read=sum(counts),
        files=len(files),
        shards=len(shards),
        ingest_key=key,
        input_bytes=sum(Path(f.path).stat().st_size for f in files),
    )
    report.file_roles = [f.role for f in files]  # the report counts per source role (corpus.roles)
    init_ray(cfg.ray, dashboard=False)  # plain tasks: no State API read

    dedup = clean_and_dedup(cfg, bank, files, shards, stage_dir, report, key)
    refuse_without_documents(cfg, stage_dir, shard_ids, sum(counts))
    tok_json, bank_tok = tokenizer_for(cfg, bank, stage_dir, shard_ids, dedup[0], report)
    keys = memo_keys(cfg, bank_tok.stem)
    with report.stage("chunk"):
        todo = pending(shard_ids, lambda s: seqs_path(stage_dir, s))
        src, dst = memo.source(bank, "chunk", keys["chunk"]), memo.target(bank, key, "chunk")
        _memo_hits(
            "chunk",
            run_tasks(
                "chunk",
                todo,
                lambda s: chunk_shard(
                    s,
                    stage_dir,
                    tok_json,
                    dedup[0],
                    cfg.chunking,
                    memo_src=src,
                    memo_dst=dst,
                    align=cfg.model.mem_chunk_size if cfg.chunking.align_docs else 0,
                    eos_id=cfg.model.eos_id,
                    pad_id=cfg.model.pad_id,
                ),
                report.note,
            ),
            report,
        )
    lineage = {
        "stage": "ingest",
        "ingest_key": key,
        "corpus_version": corpus_version,
        "tokenizer_hash": bank_tok.stem,  # tokenizers/<hash>.json
        "tokenizer_path": bank.layout.relative(bank_tok),
        "config": cfg.as_dict(),
    }
    versions = commit(bank, stage_dir, shard_ids, dedup, lineage, report)
    memo.publish(bank, key, keys, shard_ids)  # after the commit: a crash before keeps the old memo
    summary = {**report.finish(bank, cfg), "versions": versions}  # the versions this ingest wrote or found
    remove(stage_dir)
    return summary
