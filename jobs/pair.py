"""`m3 pair`: the neighbor reference of every 64-token chunk of every training sequence (the
`neighbors` table the continual training stage reads).

    python -m jobs pair -c configs/demo.yaml

Same shape as the embed job: Ray Data actors (one embedder each) pair row ranges of
`train_sequences` into staging files (pipelines/pair_step.py); one commit makes the new table
version, tagged. The key covers the provenance of every input (the ingest that made the
sequences and references, the table versions, the embed build, the pairing knobs): the same key
is nothing to do, an unfinished one resumes from its staged shards. The lineage carries
ingest_key, tokenizer_hash and chunk_size, which the trainer's reader checks before it pairs a
sequence with anything (pipelines/train_data.py).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pyarrow.compute as pa_compute
import pyarrow.parquet as pq

from jobs.config import Config, config_hash
from jobs.pair_config import PairConfig
from jobs.report import Report
from jobs.runtime import init_ray, quiet_ray_data, row_shards, run_actor_shards
from model.embedder import load_embedder
from pipelines.pair_step import PairShards, staged_path
from pipelines.train_data import NEIGHBORS
from storage.bank import Bank, BankError
from storage.staging import iter_batches
from storage.layout import BankLayout

INPUTS = ("train_sequences", "refs", "embeddings")


def _inputs(bank: Bank) -> dict[str, dict]:
    """The input tables' lineage, refusing a bank that lacks one or mixes builds."""
    bank.require(*INPUTS)
    meta = {name: bank.metadata(name) for name in INPUTS}
    ingest = meta["train_sequences"].get("ingest_key")
    for name in ("refs", "embeddings"):
        if meta[name].get("ingest_key") != ingest:
            raise BankError(f"{name} was built from ingest {meta[name].get('ingest_key')}, train_sequences "
                            f"from ingest {ingest}: rerun `{Bank.MADE_BY[name]}`")
    if "embed_key" not in meta["embeddings"] or "embedder" not in meta["embeddings"]:
        raise BankError("the embeddings table records no embed_key/embedder in its lineage: rerun `m3 embed`")
    return meta


def pair_key(bank: Bank, meta: dict[str, dict], pc: PairConfig) -> str:
    """What the neighbors depend on: the inputs' provenance and versions, and the pairing knobs."""
    seq_meta = meta["train_sequences"]
    return config_hash({"ingest_key": seq_meta.get("ingest_key"), "tokenizer_hash": seq_meta.get("tokenizer_hash"),
                        "seqs_version": bank.table("train_sequences").version,
                        "refs_version": bank.table("refs").version, "embed_key": meta["embeddings"]["embed_key"],
                        "embeddings_version": bank.table("embeddings").version, "pair": pc.output_knobs()})


def staging_dir(bank_uri: str, key: str) -> Path:
    return BankLayout(bank_uri).staging(f"pair-{key}")


def run_pair(cfg: Config) -> dict:
    report = Report("pair")
    pc = cfg.pair
    bank = Bank(cfg.bank.uri)
    meta = _inputs(bank)
    seq_meta, emb_meta = meta["train_sequences"], meta["embeddings"]
    # the embedder that wrote the vectors, not whatever the config names today: queries from
    # another model's space would retrieve confident nonsense
    spec = (emb_meta.get("config") or {}).get("retrieval", {}).get("embedder") or cfg.retrieval.embedder
    embedder = load_embedder(spec)  # fails here, before Ray, if the model is missing
    embedder.check_lineage(emb_meta["embedder"])
    tok_rel = meta["refs"].get("tokenizer_path")
    if not tok_rel:
        raise BankError("the refs table records no tokenizer_path in its lineage: rerun `m3 ingest`")
    tok_path = str(BankLayout(cfg.bank.uri).local(tok_rel))
    n_seqs = bank.dataset("train_sequences").count_rows()
    key = pair_key(bank, meta, pc)
    if bank.has("neighbors") and bank.metadata("neighbors").get("pair_key") == key:
        print(f"pair: neighbors in {cfg.bank.uri} are up to date (pair key {key}); nothing to do")
        return {"status": "up_to_date", "pair_key": key}
    stage_dir = staging_dir(cfg.bank.uri, key)
    shards = row_shards(n_seqs, pc.seqs_per_shard)
    todo = [s for s in shards if not Path(staged_path(stage_dir, s[0])).exists()]
    with report.stage("pair"):
        report.note(f"pair: {n_seqs:,} sequences, {pc.chunk_size}-token chunks, top {pc.k} by {embedder.id}, "
                    f"max overlap {pc.max_overlap}; {len(shards) - len(todo)} of {len(shards)} shard(s) done")
        if todo:
            init_ray(cfg.ray)
            quiet_ray_data()
            run_actor_shards("pair", todo, PairShards, actors=pc.actors, threads=pc.threads_per_actor,
                             bank_uri=cfg.bank.uri, embedder_spec=spec, tokenizer_path=tok_path,
                             stage_dir=str(stage_dir), cfg=pc)
    files = [Path(staged_path(stage_dir, i)) for i, _, _ in shards]
    counts = _counts(files)
    with report.stage("commit"):
        lineage = {"stage": "pair", "pair_key": key, "ingest_key": seq_meta.get("ingest_key"),
                   "tokenizer_hash": seq_meta.get("tokenizer_hash"), "chunk_size": pc.chunk_size,
                   "max_tokens": pc.max_tokens, "per_chunk": pc.per_chunk,
                   "exclude_own_docs": pc.exclude_own_docs, "leakage": "whole-sequence",
                   "embed_key": emb_meta["embed_key"], "embedder": emb_meta["embedder"].get("embedder"),
                   "pair": vars(pc), "counts": counts, "config": cfg.as_dict()}
        version = bank.write("neighbors", NEIGHBORS, iter_batches(files, columns=NEIGHBORS.names), lineage)
        bank.tag("neighbors", f"pair-{key}", version)
    shutil.rmtree(stage_dir, ignore_errors=True)
    seconds = report.elapsed()
    print(f"pair: {counts['chunks']:,} chunks of {n_seqs:,} sequences, {counts['with_neighbor']:,} with a "
          f"neighbor, {counts['dropped']:,} candidate(s) dropped by the overlap filter; neighbors version "
          f"{version} in {seconds:.1f} s")
    return {"version": version, "pair_key": key, "sequences": n_seqs, **counts, "seconds": seconds}


def _counts(files: list[Path]) -> dict:
    """From the staged files (not from the actors' say-so), so a resumed run reports it all."""
    chunks = with_neighbor = pairs = dropped = 0
    for f in files:
        t = pq.read_table(f, columns=["rank", "ref_id", "dropped"])
        first = t.filter(pa_compute.equal(t["rank"], 0))  # one row per chunk
        chunks += first.num_rows
        with_neighbor += first.num_rows - first.column("ref_id").null_count
        pairs += t.num_rows - t.column("ref_id").null_count
        dropped += int(sum(first.column("dropped").to_pylist()))
    return {"chunks": chunks, "with_neighbor": with_neighbor, "pairs": pairs, "dropped": dropped}
