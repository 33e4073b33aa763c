"""`m3 pair`: the neighbor reference of every 64-token chunk of every training sequence (the
`neighbors` table the continual training stage reads).

    python -m jobs pair -c configs/demo.yaml

A sharded stage (jobs/stages/runner.py): Ray Data actors (one embedder each) pair row ranges of
`train_sequences` into staging files (pipelines/pair_step.py); one commit makes the new table
version, tagged. The key covers the provenance of every input (the ingest that made the
sequences and references, the table versions, the embed build, the pairing knobs, the retrieval
method): the same key is nothing to do, an unfinished one resumes from its staged shards.
`retrieval.method` ranks the candidates (storage/lexical.py): bm25 and hybrid need the full-text
index `m3 embed` builds for them, checked here before Ray starts. The lineage carries
ingest_key, tokenizer_hash and chunk_size, which the trainer's reader checks before it pairs a
sequence with anything (pipelines/train_data.py).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import pyarrow.compute as pa_compute

from jobs.config import Config, config_hash
from jobs.config.pair import PairConfig
from jobs.stages.runner import ShardedStage, run_stage
from pipelines.embedder import load_embedder
from pipelines.pair_step import PairShards
from pipelines.train_data import NEIGHBORS
from storage.bank import Bank, BankError
from storage.lexical import require_fts, uses_vectors
from storage.lock import writes_bank
from storage.staging import read_table

INPUTS = ("train_sequences", "refs", "embeddings")


def _inputs(bank: Bank) -> dict[str, dict]:
    """The input tables' lineage, refusing a bank that lacks one or mixes builds."""
    bank.require(*INPUTS)
    meta = {name: bank.metadata(name) for name in INPUTS}
    ingest = meta["train_sequences"].get("ingest_key")
    for name in ("refs", "embeddings"):
        if meta[name].get("ingest_key") != ingest:
            raise BankError(
                f"{name} was built from ingest {meta[name].get('ingest_key')}, train_sequences "
                f"from ingest {ingest}: rerun `{Bank.MADE_BY[name]}`"
            )
    if "embed_key" not in meta["embeddings"] or "embedder" not in meta["embeddings"]:
        raise BankError("the embeddings table records no embed_key/embedder in its lineage: rerun `m3 embed`")
    return meta


def pair_key(bank: Bank, meta: dict[str, dict], pc: PairConfig, method: str = "vector") -> str:
    """What the neighbors depend on: the inputs' provenance and versions, the pairing knobs and
    the retrieval method."""
    seq_meta = meta["train_sequences"]
    parts = {
        "ingest_key": seq_meta.get("ingest_key"),
        "tokenizer_hash": seq_meta.get("tokenizer_hash"),
        "seqs_version": bank.table("train_sequences").version,
        "refs_version": bank.table("refs").version,
        "embed_key": meta["embeddings"]["embed_key"],
        "embeddings_version": bank.table("embeddings").version,
        "pair": pc.output_knobs(),
    }
    if method != "vector":  # absent for vector: the keys of tables paired before the method existed hold
        parts["method"] = method
    return config_hash(parts)


def pair_stage(cfg: Config, bank: Bank) -> tuple[ShardedStage, str]:
    """The pair stage's declaration, and what it ranks with (the embedder, or BM25)."""
    pc, method = cfg.pair, cfg.retrieval.method
    meta = _inputs(bank)
    seq_meta, emb_meta = meta["train_sequences"], meta["embeddings"]
    require_fts(bank.table("embeddings"), method)  # before Ray: bm25/hybrid on a table without the index
    # the embedder that wrote the vectors, not whatever the config names today: queries from
    # another model's space would retrieve confident nonsense
    spec = (emb_meta.get("config") or {}).get("retrieval", {}).get("embedder") or cfg.retrieval.embedder
    if uses_vectors(method):
        embedder = load_embedder(spec)  # fails here, before Ray, if the model is missing
        embedder.check_lineage(emb_meta["embedder"])
        ranker = embedder.id if method == "vector" else f"{embedder.id} + BM25 (reciprocal-rank fusion)"
    else:
        ranker = "BM25 (the full-text index)"
    tok_rel = meta["refs"].get("tokenizer_path")
    if not tok_rel:
        raise BankError("the refs table records no tokenizer_path in its lineage: rerun `m3 ingest`")
    key = pair_key(bank, meta, pc, method)
    seqs = bank.dataset("train_sequences")

    def lineage(files: list[Path]) -> dict:
        return {
            "stage": "pair",
            "pair_key": key,
            "ingest_key": seq_meta.get("ingest_key"),
            "tokenizer_hash": seq_meta.get("tokenizer_hash"),
            "chunk_size": pc.chunk_size,
            "max_tokens": pc.max_tokens,
            "per_chunk": pc.per_chunk,
            "exclude_own_docs": pc.exclude_own_docs,
            "leakage": "whole-sequence",
            "embed_key": emb_meta["embed_key"],
            "embedder": emb_meta["embedder"].get("embedder"),
            "method": method,
            "pair": vars(pc),
            "counts": _counts(files),
            "config": cfg.as_dict(),
        }

    stage = ShardedStage(
        name="pair",
        table="neighbors",
        key_field="pair_key",
        key=key,
        schema=NEIGHBORS,
        input_uri=seqs.uri,
        n_rows=seqs.count_rows(),
        rows_per_shard=pc.seqs_per_shard,
        actor=PairShards,
        actor_kw={
            "bank": bank,
            "embedder_spec": spec,
            "cfg": pc,
            "method": method,
            "tokenizer_path": str(bank.layout.path(tok_rel)),
        },
        actors=pc.actors,
        threads=pc.threads_per_actor,
        lineage=lineage,
    )
    return stage, ranker


@writes_bank("pair")  # the bank's write lock (storage/lock.py), reentrant under m3 run
def run_pair(cfg: Config, note: Callable[[str], None] = print) -> dict:
    pc = cfg.pair
    bank = Bank.of(cfg)
    stage, embedder = pair_stage(cfg, bank)
    note(
        f"pair: {stage.n_rows:,} sequences, {pc.chunk_size}-token chunks, top {pc.k} by {embedder}, "
        f"max overlap {pc.max_overlap}"
    )
    out = run_stage(stage, bank, cfg.ray, note)
    if out["status"] == "up_to_date":
        return out
    counts = bank.metadata("neighbors")["counts"]
    note(
        f"pair: {counts['chunks']:,} chunks of {stage.n_rows:,} sequences, {counts['with_neighbor']:,} with a "
        f"neighbor, {counts['dropped']:,} candidate(s) dropped by the overlap filter; neighbors version "
        f"{out['version']} in {out['seconds']:.1f} s"
    )
    return {**out, "sequences": stage.n_rows, **counts}


def _counts(files: list[Path]) -> dict:
    """From the staged files (not from the actors' say-so), so a resumed run reports it all."""
    chunks = with_neighbor = pairs = dropped = 0
    for f in files:
        t = read_table(f, columns=["rank", "ref_id", "dropped"])
        first = t.filter(pa_compute.equal(t["rank"], 0))  # one row per chunk
        chunks += first.num_rows
        with_neighbor += first.num_rows - first.column("ref_id").null_count
        pairs += t.num_rows - t.column("ref_id").null_count
        dropped += int(sum(first.column("dropped").to_pylist()))
    return {"chunks": chunks, "with_neighbor": with_neighbor, "pairs": pairs, "dropped": dropped}
