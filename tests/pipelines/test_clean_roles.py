"""Source roles (corpus.roles) in the clean step: a bank-only source is knowledge and never training
text, a training-only source is training text and never a reference; a record its role's filters
all refuse is a reject with the reason of the filter its role applies; the memo keeps what the
text decides, so a changed role re-decides the record from it."""

from __future__ import annotations

import json

import numpy as np
import pytest

from jobs.config import load_config
from pipelines import memo
from pipelines.chunk_step import chunk_shard
from pipelines.clean_step import BANK_ROLE, clean_shard
from pipelines.filters import quality_reason
from pipelines.normalize import normalize_text
from pipelines.readers import InputError, count_records, expand_paths, plan_shards
from pipelines.tokenizer import train_bpe
from storage.bank import Bank
from storage.staging import read_table
from tests.conftest import ROOT, foldoc_records

# refused by both filters, for different reasons: the bank's (too few alphabetic words) is not
# the training filter's (too few words)
NUMBERS = "1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20 twenty numbers"


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("roles")
    recs = foldoc_records(400)
    long = [r for r in recs if len(r["text"].split()) >= 120]
    short = [r for r in recs if 8 <= len(r["text"].split()) < 30]
    files = {
        "kb": long[:6] + short[:6] + [{"id": "kb-numbers", "text": NUMBERS}],
        "web": long[6:14] + short[6:12],
        "mixed": long[14:18] + short[12:16],
    }
    for name, rows in files.items():
        (root / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root, files


def cfg_for(root, roles: dict[str, str]):
    paths = [str(root / f"{n}.jsonl") for n in ("kb", "web", "mixed")]
    return load_config(
        ROOT / "configs" / "demo.yaml",
        [
            f"corpus.paths=[{', '.join(paths)}]",
            "corpus.roles={" + ", ".join(f"{root / (n + '.jsonl')}: {r}" for n, r in roles.items()) + "}",
            "dedup.partitions=1",
        ],
    )


def clean(cfg, out, memo_src=None, memo_dst=None):
    files = expand_paths(cfg.corpus.paths, cfg.corpus.format, cfg.corpus.roles)
    counts = [count_records(f, cfg.corpus.max_record_bytes)[0] for f in files]
    shards = plan_shards(files, counts, 1000)
    results = [
        clean_shard(
            s, files, cfg.corpus, cfg.quality, cfg.dedup, out, cfg.bank_quality, memo_src=memo_src, memo_dst=memo_dst
        )
        for s in shards
    ]
    docs = {}
    for name in ("docs", "rejects"):
        rows = [r for s in shards for r in read_table(out / name / f"{s.shard_id}.parquet").to_pylist()]
        docs[name] = {r["source_id"]: r for r in rows}
    return shards, results, docs


def test_each_role_is_decided_by_its_own_filters(corpus, tmp_path):
    root, files = corpus
    cfg = cfg_for(root, {"kb": "bank", "web": "training"})
    shards, _, got = clean(cfg, tmp_path / "stage")
    docs, rejects = got["docs"], got["rejects"]
    assert len(docs) + len(rejects) == sum(len(v) for v in files.values())
    reasons = {
        r["id"]: (
            quality_reason(normalize_text(r["text"]), cfg.quality),
            quality_reason(normalize_text(r["text"]), cfg.bank_quality),
        )
        for rows in files.values()
        for r in rows
    }

    for r in files["kb"]:  # knowledge only: never training text, even the long entries
        training, bank = reasons[r["id"]]
        if bank is None:
            d = docs[r["id"]]
            assert d["in_bank"] and not d["in_training"] and d["training_reason"] == BANK_ROLE
        else:  # the bank filter's reason, not the training filter's
            assert rejects[r["id"]]["reason"] == bank != training
    assert "kb-numbers" in rejects and any(reasons[r["id"]][0] is None for r in files["kb"])

    for r in files["web"]:  # training text only: never a reference, even the short entries
        training, bank = reasons[r["id"]]
        if training is None:
            d = docs[r["id"]]
            assert d["in_training"] and not d["in_bank"] and d["training_reason"] is None
        else:
            assert rejects[r["id"]]["reason"] == training
    assert any(reasons[r["id"]] == (reasons[r["id"]][0], None) and reasons[r["id"]][0] for r in files["web"]), (
        "a short entry the bank filter would keep, refused as training text"
    )

    for r in files["mixed"]:  # both: each filter decides, as without roles
        training, bank = reasons[r["id"]]
        if training is None or bank is None:
            d = docs[r["id"]]
            assert (d["in_training"], d["in_bank"]) == (training is None, bank is None)
        else:
            assert rejects[r["id"]]["reason"] == training

    # what the chunk step makes of them: references only from bank-role and both-role sources,
    # training sequences only from training-role and both-role sources
    texts = [d["text"] for d in docs.values()]
    tok = train_bpe(texts, vocab_size=400)
    by_doc = {d["doc_id"]: d["source_id"] for d in docs.values()}
    refs, seq_docs = set(), set()
    chunking = cfg.chunking.__class__(ref_max_tokens=64, ref_min_tokens=16, seq_len=64)
    for s in shards:
        chunk_shard(s.shard_id, tmp_path / "stage", tok.to_str(), np.zeros(0, np.int64), chunking)
        refs |= {
            by_doc[d]
            for d in read_table(tmp_path / "stage" / "refs" / f"{s.shard_id}.parquet").column("doc_id").to_pylist()
        }
        for ids in read_table(tmp_path / "stage" / "seqs" / f"{s.shard_id}.parquet").column("doc_ids").to_pylist():
            seq_docs |= {by_doc[d] for d in ids}
    kb, web, mixed = ({r["id"] for r in files[n]} for n in ("kb", "web", "mixed"))
    assert refs & kb and refs & mixed and not refs & web
    assert seq_docs & web and seq_docs & mixed and not seq_docs & kb


def test_a_changed_role_re_decides_from_the_memo(corpus, tmp_path):
    root, files = corpus
    bank = tmp_path / "bank"
    first = cfg_for(root, {"kb": "bank", "web": "training"})
    clean(first, tmp_path / "a", memo_dst=memo.target(Bank(str(bank)), "b1", "clean"))
    shards = plan_shards(expand_paths(first.corpus.paths), [len(v) for v in files.values()], 1000)
    memo.publish(Bank(str(bank)), "b1", {"clean": "k"}, [s.shard_id for s in shards])

    swapped = cfg_for(root, {"kb": "training", "web": "bank"})
    _, results, got = clean(swapped, tmp_path / "b", memo_src=memo.source(Bank(str(bank)), "clean", "k"))
    assert sum(r["memo_hits"] for r in results) == sum(len(v) for v in files.values())  # nothing re-normalized
    fresh = clean(swapped, tmp_path / "c")[2]
    assert got == fresh  # the memo's decisions under the new roles are a fresh build's
    kb_docs = [got["docs"][r["id"]] for r in files["kb"] if r["id"] in got["docs"]]
    web_docs = [got["docs"][r["id"]] for r in files["web"] if r["id"] in got["docs"]]
    assert kb_docs and all(d["in_training"] and not d["in_bank"] for d in kb_docs)
    assert web_docs and all(d["in_bank"] and not d["in_training"] for d in web_docs)


def test_a_file_has_one_role(tmp_path):
    (tmp_path / "d").mkdir()
    for name in ("a", "b"):
        (tmp_path / "d" / f"{name}.jsonl").write_text('{"text": "x"}\n')
    d, a, glob = str(tmp_path / "d"), str(tmp_path / "d" / "a.jsonl"), str(tmp_path / "d" / "*.jsonl")
    files = expand_paths([glob], roles={glob: "bank"})
    assert [(f.name, f.role) for f in files] == [("a.jsonl", "bank"), ("b.jsonl", "bank")]
    assert [f.role for f in expand_paths([a, d], roles={a: "training", d: "training"})] == ["training", "training"]
    assert [f.role for f in expand_paths([a, d])] == ["both", "both"]
    with pytest.raises(InputError, match=r"a.jsonl is named by .*a.jsonl' \(role training\) and by .*d' \(role both\)"):
        expand_paths([a, d], roles={a: "training"})
