"""The pair job end to end on a small ingested + embedded FOLDOC bank: a chunk's best references
(rank 0 first), the eq. 6 overlap filter measured against the whole stored sequence (no
reference the sequence contains is ever its neighbor, even one beyond the trained window),
own-document exclusion, a no-op rerun, and the trainer's reader accepting the table."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from jobs.config import load_config
from jobs.config.pair import PairConfig
from jobs.stages.embed import run_embed
from jobs.stages.pair import run_pair
from pipelines.overlap import overlap
from pipelines.train_data import NEIGHBORS, ShardReader
from storage.bank import Bank, BankError
from storage.lexical import LexicalIndexError
from tests.conftest import small_embedded_bank, small_facts_bank

pytestmark = pytest.mark.slow

PAIR = PairConfig(k=8, max_overlap=0.9, chunk_size=64, seqs_per_shard=8, threads_per_actor=1, per_chunk=5)


def with_pair(cfg, pair: PairConfig):
    return dataclasses.replace(cfg, pair=pair)


@pytest.fixture(scope="module")
def paired(tmp_path_factory, ray_local):
    cfg, _, _ = small_embedded_bank(tmp_path_factory.mktemp("pair"))
    cfg = with_pair(cfg, PAIR)
    return cfg, run_pair(cfg)


def _tables(cfg):
    bank = Bank(cfg.bank.uri)
    seqs = {r["seq_id"]: r for r in bank.dataset("train_sequences").to_table().to_pylist()}
    refs = {
        r["ref_id"]: r for r in bank.dataset("refs").to_table(columns=["ref_id", "doc_id", "token_ids"]).to_pylist()
    }
    rows = bank.dataset("neighbors").to_table().to_pylist()
    return bank, seqs, refs, rows


def _contains(seq: list[int], ref: list[int]) -> bool:
    """ref's tokens appear contiguously in seq (a verbatim copy of part of the sequence)."""
    s, r = np.asarray(seq, np.int32).tobytes(), np.asarray(ref, np.int32).tobytes()
    at = s.find(r)
    while at != -1 and at % 4:
        at = s.find(r, at + 1)
    return at != -1


def test_every_chunk_has_its_best_references_ranked_and_counted(paired):
    cfg, summary = paired
    bank, seqs, _, rows = _tables(cfg)
    assert bank.dataset("neighbors").schema.remove_metadata() == NEIGHBORS
    expected = sorted((sid, c) for sid, s in seqs.items() for c in range(-(-len(s["token_ids"]) // 64)))
    by_chunk: dict[tuple, list[dict]] = {}
    for r in rows:
        by_chunk.setdefault((r["seq_id"], r["chunk"]), []).append(r)
    assert sorted(by_chunk) == expected
    for got in by_chunk.values():
        got.sort(key=lambda r: r["rank"])
        assert [r["rank"] for r in got] == list(range(len(got))) and 1 <= len(got) <= PAIR.per_chunk
        assert len({r["ref_id"] for r in got}) == len(got)
        assert [r["score"] for r in got] == sorted((r["score"] for r in got), reverse=True) or got[0]["ref_id"] is None
    assert sum(len(g) == PAIR.per_chunk for g in by_chunk.values()) > len(by_chunk) // 2  # most chunks full
    first = [g[0] for g in by_chunk.values()]
    hits = [r for r in rows if r["ref_id"] is not None]
    assert summary["chunks"] == len(by_chunk) and summary["pairs"] == len(hits) > 0
    assert summary["with_neighbor"] == sum(r["ref_id"] is not None for r in first) > 0
    assert all(r["score"] is None and r["overlap"] is None for r in rows if r["ref_id"] is None)
    assert bank.tags("neighbors") == {f"pair-{summary['pair_key']}": summary["version"]}


def test_kept_neighbors_pass_the_overlap_filter_exactly(paired):
    cfg, _ = paired
    _, seqs, refs, rows = _tables(cfg)
    for r in rows:
        if r["ref_id"] is None:
            continue
        assert r["overlap"] <= PAIR.max_overlap and -1 <= r["score"] <= 1
        recomputed = overlap(seqs[r["seq_id"]]["token_ids"], refs[r["ref_id"]]["token_ids"])
        assert np.float32(recomputed) == np.float32(r["overlap"])


def test_a_reference_copied_from_the_sequence_is_never_its_neighbor(paired):
    cfg, summary = paired
    _, seqs, refs, rows = _tables(cfg)
    by_doc: dict[str, list[dict]] = {}
    for ref in refs.values():
        by_doc.setdefault(ref["doc_id"], []).append(ref)
    # every reference of the sequence's own documents that the sequence holds verbatim
    own = {
        sid: {
            ref["ref_id"]
            for d in s["doc_ids"]
            for ref in by_doc.get(d, [])
            if _contains(s["token_ids"], ref["token_ids"])
        }
        for sid, s in seqs.items()
    }
    assert sum(map(len, own.values())) > 0  # the fixture has such references to filter
    assert not [r for r in rows if r["ref_id"] in own[r["seq_id"]]]
    # they are what retrieval finds first for a chunk (its own text): the filter had work to do
    assert summary["dropped"] > 0


def test_own_documents_excluded_when_asked(paired):
    """pair.exclude_own_docs (what `m3 eval` does to held-out text): no neighbor comes from the
    sequence's own documents, not even one straddling the sequence's end, which eq. 6 against
    the sequence alone lets through (it holds only part of the sequence's text)."""
    from pipelines.embedder import load_embedder
    from pipelines.pair_step import pair_shard
    from pipelines.tokenizer import load
    from storage.vectors import search_params

    cfg, _ = paired
    bank, seqs, refs, rows = _tables(cfg)
    straddling = [
        r for r in rows if r["ref_id"] is not None and refs[r["ref_id"]]["doc_id"] in seqs[r["seq_id"]]["doc_ids"]
    ]
    assert straddling  # the paper's rule alone keeps some: the fixture shows the case
    table = bank.table("embeddings")
    ids = sorted(seqs)
    args = dict(
        tokenizer=load(f"{cfg.bank.uri}/{bank.metadata('refs')['tokenizer_path']}"),
        embedder=load_embedder(cfg.retrieval.embedder),
        table=table,
        refs_ds=bank.dataset("refs"),
        params=search_params(table),
        doc_ids=[seqs[i]["doc_ids"] for i in ids],
    )
    out = pair_shard(
        ids, [seqs[i]["token_ids"] for i in ids], cfg=dataclasses.replace(PAIR, exclude_own_docs=True), **args
    ).to_pylist()
    assert {(r["seq_id"], r["chunk"]) for r in out} == {(r["seq_id"], r["chunk"]) for r in rows}
    kept = [r for r in out if r["ref_id"] is not None]
    assert kept and not [r for r in kept if refs[r["ref_id"]]["doc_id"] in seqs[r["seq_id"]]["doc_ids"]]


def test_rerun_is_a_noop(paired, capsys):
    cfg, summary = paired
    version = Bank(cfg.bank.uri).table("neighbors").version
    again = run_pair(cfg)
    assert (again["status"], again["pair_key"], again["version"]) == ("up_to_date", summary["pair_key"], version)
    assert "nothing to do" in capsys.readouterr().out
    assert Bank(cfg.bank.uri).table("neighbors").version == version


def test_the_trainer_reads_the_neighbors(paired):
    cfg, _ = paired
    meta = Bank(cfg.bank.uri).metadata("neighbors")
    seq_meta = Bank(cfg.bank.uri).metadata("train_sequences")
    assert meta["chunk_size"] == 64 and meta["embed_key"] == Bank(cfg.bank.uri).metadata("embeddings")["embed_key"]
    assert (meta["ingest_key"], meta["tokenizer_hash"]) == (seq_meta["ingest_key"], seq_meta["tokenizer_hash"])
    reader = ShardReader(
        Bank(cfg.bank.uri), neighbors=True, chunk_size=64, heldout_fraction=0.0, micro_batch=2, refs_per_chunk=5
    )
    batch = next(reader.epoch_batches())
    assert batch["ref_tokens"].shape[:3] == batch["ref_valid"].shape == (2, 4, 5) and batch["ref_valid"].all(-1).any()
    rows = {(r["seq_id"], r["chunk"], r["rank"]): r["ref_id"] for r in _tables(cfg)[3]}
    refs = _tables(cfg)[2]
    for b, sid in enumerate(batch["seq_ids"]):  # slot (c, m) holds the chunk's rank-m reference
        for c in range(4):
            for m in range(5):
                rid = rows.get((sid, c, m))
                assert bool(batch["ref_valid"][b, c, m]) == (rid is not None)
                if rid is not None:
                    n = len(refs[rid]["token_ids"])
                    assert batch["ref_tokens"][b, c, m, :n].tolist() == refs[rid]["token_ids"]
    with pytest.raises(BankError, match="keeps 5 reference"):
        ShardReader(Bank(cfg.bank.uri), neighbors=True, chunk_size=64, heldout_fraction=0.0, refs_per_chunk=6)
    with pytest.raises(BankError, match="pairs 64-token chunks"):
        ShardReader(Bank(cfg.bank.uri), neighbors=True, chunk_size=32, heldout_fraction=0.0)


def test_pair_needs_its_inputs(tmp_path):
    cfg = load_config("configs/demo.yaml", [f"bank.uri={tmp_path}"])
    with pytest.raises(BankError, match="no train_sequences table: run `m3 ingest` first"):
        run_pair(cfg)


def test_resume_keeps_staged_shards_and_matches_an_uninterrupted_run(paired, capsys):
    """Runs last: it commits a new neighbors version (same rows, under another key). The shard
    staged by hand is moved to the name the pair stage gave its files before the stages shared
    one shard actor (p000000.parquet): a job half done by that code resumes from it, not
    computing it again, nor committing it twice (the kill test resumes from today's names)."""
    from jobs.stages.pair import _inputs, pair_key
    from jobs.stages.runner import staging_dir
    from pipelines.pair_step import PairShards
    from pipelines.shard_actor import staged_path

    cfg, _ = paired
    before = sorted((r["seq_id"], r["chunk"], r["rank"], r["ref_id"], r["score"]) for r in _tables(cfg)[3])
    # another shard layout (a new key, so a fresh staging dir) whose shard 0 is staged by hand,
    # as a run killed after one shard would have left it
    pair2 = dataclasses.replace(PAIR, seqs_per_shard=5)
    bank = Bank(cfg.bank.uri)
    stage = staging_dir(bank, "pair", pair_key(bank, _inputs(bank), pair2))
    tok = f"{cfg.bank.uri}/{bank.metadata('refs')['tokenizer_path']}"
    PairShards(
        bank,
        cfg.retrieval.embedder,
        tok,
        pair2,
        input_uri=bank.dataset("train_sequences").uri,
        stage_dir=str(stage),
        threads=1,
    )({"shard": [0], "start": [0], "end": [5]})
    staged_path(stage, 0).rename(stage / "p000000.parquet")
    summary = run_pair(with_pair(cfg, pair2))
    n_shards = -(-len(_tables(cfg)[1]) // 5)
    assert f"1 of {n_shards} shard(s) done" in capsys.readouterr().out
    assert summary["chunks"] == len({b[:2] for b in before}) and not stage.exists()
    # the same rows as the first, uninterrupted run with another layout
    after = sorted((r["seq_id"], r["chunk"], r["rank"], r["ref_id"], r["score"]) for r in _tables(cfg)[3])
    assert [a[:4] for a in after] == [b[:4] for b in before]
    assert np.allclose([a[4] or 0 for a in after], [b[4] or 0 for b in before], atol=1e-5)


def test_killed_pair_resumes_and_max_tokens_pairs_only_what_training_reads(paired, tmp_path):
    """A real kill (the job's process exits after its first shard) on a copy of the bank, with
    pair.max_tokens=128: the rerun keeps the staged shard, and the table holds exactly the
    first two 64-token chunks of every sequence, paired as the full run paired them."""
    import os
    import shutil
    import subprocess
    import sys

    from tests.conftest import ROOT

    cfg, _ = paired
    full = {(r["seq_id"], r["chunk"], r["rank"]): r["ref_id"] for r in _tables(cfg)[3]}
    bank = tmp_path / "bank"
    shutil.copytree(cfg.bank.uri, bank)
    overrides = [
        f"bank.uri={bank}",
        "pair.max_tokens=128",
        "train.max_tokens=128",
        "pair.seqs_per_shard=8",
        "ray.num_cpus=2",
        "pair.threads_per_actor=1",
    ]
    args = [sys.executable, "-m", "jobs", "pair", "-c", "configs/demo.yaml"]
    for s in overrides:
        args += ["--set", s]
    env = dict(os.environ, M3_PROGRESS="0", M3_CRASH_AT="pair:1")
    proc = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 75, proc.stderr[-3000:]
    n_seqs = len(_tables(cfg)[1])
    staged = list(bank.glob("_staging/pair-*/shards/*.parquet"))
    assert 1 <= len(staged) < -(-n_seqs // 8)  # killed part-way: some shards staged, not all
    cfg2 = dataclasses.replace(
        cfg,
        bank=dataclasses.replace(cfg.bank, uri=str(bank)),
        pair=dataclasses.replace(PAIR, max_tokens=128),
        train=dataclasses.replace(cfg.train, max_tokens=128),
    )
    run_pair(cfg2)
    rows = Bank(str(bank)).dataset("neighbors").to_table().to_pylist()
    assert sorted({r["chunk"] for r in rows}) == [0, 1]
    # leakage is measured against the WHOLE stored sequence, not the 128 tokens training reads: a
    # reference of the sequence's later text (straddling the window's edge, or beyond it) holds
    # text of the sequence all the same. So chunks 0 and 1 get exactly what the full run gave them.
    assert {(r["seq_id"], r["chunk"], r["rank"]): r["ref_id"] for r in rows} == {
        k: v for k, v in full.items() if k[1] < 2
    }
    seqs, refs = _tables(cfg)[1], _tables(cfg)[2]
    kept = [r for r in rows if r["ref_id"] is not None]
    assert kept and all(
        overlap(seqs[r["seq_id"]]["token_ids"], refs[r["ref_id"]]["token_ids"]) <= PAIR.max_overlap for r in kept
    )
    assert Bank(str(bank)).metadata("neighbors")["max_tokens"] == 128
    with pytest.raises(BankError, match="pairs the first 128 tokens"):
        ShardReader(Bank(str(bank)), neighbors=True, chunk_size=64, heldout_fraction=0.0, max_tokens=192)
    ShardReader(Bank(str(bank)), neighbors=True, chunk_size=64, heldout_fraction=0.0, max_tokens=128)


def test_a_second_index_build_pairs_alike(paired, tmp_path):
    """The index is built again on a copy of the bank (a new embeddings version: a new pair key)
    and the pairs are the same. At this bank's size (tens of references) any HNSW graph is exact;
    tests/jobs/stages/test_embed.py holds the case where in-process builds did differ."""
    import shutil

    from jobs.stages.embed import build_reproducible_index

    cfg, summary = paired
    bank = tmp_path / "bank"
    shutil.copytree(cfg.bank.uri, bank)
    n = Bank(str(bank)).table("embeddings").count_rows()
    assert n >= cfg.retrieval.index_threshold  # the index path
    assert build_reproducible_index(
        Bank(str(bank)), "embeddings", n, cfg.retrieval.index_threshold, cfg.retrieval.index_type
    )["reproducible"]
    cfg2 = dataclasses.replace(cfg, bank=dataclasses.replace(cfg.bank, uri=str(bank)))
    again = run_pair(cfg2)
    assert again["status"] != "up_to_date" and again["pair_key"] != summary["pair_key"]
    key = ("seq_id", "chunk", "rank")
    first = sorted(_tables(cfg)[3], key=lambda r: tuple(r[k] for k in key))
    second = sorted(_tables(cfg2)[3], key=lambda r: tuple(r[k] for k in key))
    assert [(r["seq_id"], r["chunk"], r["rank"], r["ref_id"]) for r in first] == [
        (r["seq_id"], r["chunk"], r["rank"], r["ref_id"]) for r in second
    ]
    assert np.allclose([r["score"] or 0 for r in first], [r["score"] or 0 for r in second], atol=1e-5)


# -- retrieval.method bm25 / hybrid (storage/lexical.py): the same stage, another ranking


def named_hits(cfg, names: dict[str, str]) -> tuple[int, int]:
    """(chunks whose rank-0 reference describes an entity the chunk names, chunks): what
    bench/facts_pairing.py measures on the whole facts corpus."""
    from pipelines.tokenizer import load
    from storage.layout import BankLayout

    bank = Bank(cfg.bank.uri)
    tok = load(BankLayout(cfg.bank.uri).path(bank.metadata("refs")["tokenizer_path"]))
    source = {
        d["doc_id"]: d["source_id"]
        for d in bank.dataset("documents").to_table(columns=["doc_id", "source_id"]).to_pylist()
    }
    seqs = {
        s["seq_id"]: s["token_ids"]
        for s in bank.dataset("train_sequences").to_table(columns=["seq_id", "token_ids"]).to_pylist()
    }
    first = [r for r in bank.dataset("neighbors").to_table().to_pylist() if r["rank"] == 0]
    hits = 0
    for r in first:
        text = tok.decode(seqs[r["seq_id"]][r["chunk"] * 64 : (r["chunk"] + 1) * 64])
        entity = source.get(r["ref_id"].rsplit("-", 1)[0]) if r["ref_id"] else None
        hits += entity in names and names[entity] in text
    return hits, len(first)


@pytest.fixture(scope="module")
def facts(tmp_path_factory, ray_local):
    # packed 512-token sequences, as the lexical numbers were measured: every 64-token chunk
    # names an entity (configs/facts.yaml's one-document sequences leave a long FAQ's tail, in
    # its second sequence, naming none, whatever the method)
    cfg, _, names = small_facts_bank(
        tmp_path_factory.mktemp("pair-lexical"),
        "chunking.seq_len=512",
        "chunking.align_docs=false",
        "pair.max_tokens=512",
        "train.max_tokens=512",
    )
    return cfg, names


def test_bm25_pairs_chunks_with_the_entities_they_name(facts, capsys):
    cfg, names = facts
    run_pair(cfg)
    vector_hits, chunks = named_hits(cfg, names)
    bm25 = with_method(cfg, "bm25")
    run_embed(bm25)  # the text and its full-text index (the vectors copied)
    summary = run_pair(bm25)
    assert summary["status"] == "built" and summary["chunks"] == chunks
    bank = Bank(cfg.bank.uri)
    assert bank.dataset("neighbors").schema.remove_metadata() == NEIGHBORS  # the schema of every method
    meta = bank.metadata("neighbors")
    assert meta["method"] == "bm25" and meta["pair_key"] == summary["pair_key"]
    hits, _ = named_hits(bm25, names)
    print(f"rank 0 names an entity of the chunk: vector {vector_hits}, bm25 {hits} of {chunks} chunks")
    assert hits >= 0.9 * chunks and hits > vector_hits  # names are what BM25 matches
    rows = bank.dataset("neighbors").to_table().to_pylist()
    by_chunk: dict[tuple, list[dict]] = {}
    for r in rows:
        by_chunk.setdefault((r["seq_id"], r["chunk"]), []).append(r)
    for got in by_chunk.values():  # BM25 scores: positive, best first; the overlap filter as ever
        got.sort(key=lambda r: r["rank"])
        assert all(r["score"] > 0 and r["overlap"] <= bm25.pair.max_overlap for r in got if r["ref_id"])
        assert [r["score"] for r in got] == sorted((r["score"] for r in got), reverse=True)
    capsys.readouterr()
    assert run_pair(bm25)["status"] == "up_to_date" and "nothing to do" in capsys.readouterr().out


def test_hybrid_pairs_again_on_the_same_embeddings(facts):
    cfg, names = facts
    hybrid = with_method(cfg, "hybrid")
    run_embed(with_method(cfg, "bm25"))
    assert run_embed(hybrid)["status"] == "up_to_date"  # bm25's table serves hybrid as it is
    summary = run_pair(hybrid)
    assert summary["status"] == "built"  # another method: other neighbors
    bank = Bank(cfg.bank.uri)
    assert bank.metadata("neighbors")["method"] == "hybrid"
    scores = [r["score"] for r in bank.dataset("neighbors").to_table().to_pylist() if r["ref_id"]]
    assert scores and all(0 < s <= 2 / 61 + 1e-6 for s in scores)  # reciprocal-rank sums
    hits, chunks = named_hits(hybrid, names)
    assert hits >= 0.8 * chunks


def test_a_lexical_method_needs_the_full_text_index(facts):
    cfg, _ = facts
    run_embed(cfg)  # vector: the table without text or index
    with pytest.raises(LexicalIndexError, match="retrieval.method 'bm25'.*run `m3 embed`"):
        run_pair(with_method(cfg, "bm25"))


def with_method(cfg, method: str):
    return dataclasses.replace(cfg, retrieval=dataclasses.replace(cfg.retrieval, method=method))
