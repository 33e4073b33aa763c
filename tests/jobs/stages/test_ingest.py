"""End to end: a small real corpus with planted bad records and duplicates, through Ray."""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from jobs.config import load_config
from jobs.stages.ingest import run_ingest
from pipelines.tokenizer import from_json
from storage.bank import Bank
from tests.conftest import ROOT, foldoc_records

pytestmark = pytest.mark.slow

BAD_LINES = [
    b"{not json",
    b'{"text": "caf\xe9 au lait"}',
    b'{"id": "no-text"}',
    b'{"text": ["a", "list"]}',
    b"",
    b"\x00\x01\x02\xff binary junk \xfe",
    b'{"text": "   \\n\\t  "}',
    b'"just a string"',
]
BAD_REASONS = {
    "malformed_json",
    "invalid_utf8",
    "missing_text",
    "text_not_string",
    "blank_line",
    "empty",
    "not_an_object",
}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    recs = foldoc_records(260)  # real entries, long and short: the quality filters see both
    long = [r for r in recs if len(r["text"].split()) >= 150]
    exact = dict(long[0], id="copy-exact", text="  " + long[0]["text"].replace(" ", "   ") + "\n\n")
    words = long[1]["text"].split(" ")
    words[len(words) // 2] = "DIFFERENT"
    near = dict(long[1], id="copy-near", text=" ".join(words))
    lines = [json.dumps(r).encode() for r in recs[:130]] + BAD_LINES + [json.dumps(exact).encode()]
    lines += [json.dumps(r).encode() for r in recs[130:]] + [json.dumps(near).encode()]
    # one 20 MB document: rejected by a filter's reason, never a crash or an out-of-memory
    body = " ".join(r["text"] for r in recs)
    lines.append(json.dumps({"id": "huge", "text": (body * (20_000_000 // len(body) + 1))[:20_000_000]}).encode())
    with gzip.open(root / "part-0.jsonl.gz", "wb") as f:
        f.write(b"\n".join(lines) + b"\n")
    return {
        "dir": root,
        "records": len(lines),
        "exact": (long[0]["id"], "copy-exact"),
        "near": (long[1]["id"], "copy-near"),
    }


def make_config(corpus, bank: Path, *extra: str):
    return load_config(
        "configs/demo.yaml",
        [
            f"corpus.paths=[{corpus['dir']}/part-0.jsonl.gz]",
            f"bank.uri={bank}",
            "corpus.records_per_shard=60",
            "tokenizer.vocab_size=600",
            "chunking.seq_len=256",
            "ray.num_cpus=2",
            *extra,
        ],
    )


def table_rows(bank: Bank, name: str, key: str) -> list[dict]:
    rows = bank.dataset(name).to_table().to_pylist()
    return sorted(rows, key=lambda r: (r[key], r.get("reason") or ""))


def snapshot(uri: Path) -> dict:
    bank = Bank(str(uri))
    keys = {"documents": "doc_id", "rejects": "doc_id", "refs": "ref_id", "train_sequences": "seq_id"}
    return {name: table_rows(bank, name, key) for name, key in keys.items()}


@pytest.fixture(scope="module")
def reference_run(corpus, tmp_path_factory, ray_local):
    bank = tmp_path_factory.mktemp("bank") / "ref"
    summary = run_ingest(make_config(corpus, bank))
    return bank, summary, snapshot(bank)


def source_doc_id(snap, source_id):
    return next(r["doc_id"] for r in snap["documents"] + snap["rejects"] if r["source_id"] == source_id)


def test_nothing_is_lost(corpus, reference_run):
    _, summary, snap = reference_run
    assert summary["records_read"] == corpus["records"]
    assert len(snap["documents"]) + len(snap["rejects"]) == corpus["records"]
    assert summary["accounted"]
    reasons = {r["reason"] for r in snap["rejects"]}
    assert BAD_REASONS <= reasons
    assert "too_few_words" in reasons  # FOLDOC's one-line entries
    assert next(r for r in snap["rejects"] if r["source_id"] == "huge")["reason"] == "too_long"
    ids = [r["doc_id"] for r in snap["documents"]] + [r["doc_id"] for r in snap["rejects"]]
    assert len(ids) == len(set(ids))


def test_duplicates_name_their_kept_twin(corpus, reference_run):
    _, _, snap = reference_run
    by_id = {r["doc_id"]: r for r in snap["rejects"]}
    kept = {r["doc_id"] for r in snap["documents"]}
    for kind, (orig, copy) in (("duplicate_exact", corpus["exact"]), ("duplicate_near", corpus["near"])):
        rej = by_id[source_doc_id(snap, copy)]
        assert rej["reason"] == kind and rej["stage"] == "dedup"
        assert rej["duplicate_of"] == source_doc_id(snap, orig) and rej["duplicate_of"] in kept
    for r in snap["rejects"]:
        if r["reason"].startswith("duplicate_"):
            assert r["duplicate_of"] in kept


def test_references_cover_each_document_exactly(reference_run):
    bank_dir, _, snap = reference_run
    bank = Bank(str(bank_dir))
    meta = bank.metadata("refs")
    tok = from_json((bank_dir / meta["tokenizer_path"]).read_text())
    refs_by_doc: dict[str, list] = {}
    for r in snap["refs"]:
        assert 1 <= r["n_tokens"] == len(r["token_ids"]) <= 128
        refs_by_doc.setdefault(r["doc_id"], []).append(r)
    in_bank = [d for d in snap["documents"] if d["in_bank"]]
    assert set(refs_by_doc) == {d["doc_id"] for d in in_bank}  # no ref from a rejected doc
    for doc in in_bank:
        parts = sorted(refs_by_doc[doc["doc_id"]], key=lambda r: r["ordinal"])
        ids = [t for p in parts for t in p["token_ids"]]
        assert ids == tok.encode(doc["text"], add_special_tokens=False).ids
        assert [p["start_token"] for p in parts] == [sum(q["n_tokens"] for q in parts[:i]) for i in range(len(parts))]
    for s in snap["train_sequences"]:
        assert len(s["token_ids"]) == 256 and s["doc_ids"]


def test_the_bank_keeps_short_entries_that_training_text_does_not(reference_run):
    """The demo's bank_quality keeps short dictionary entries (facts) as references; training
    sequences are made only of documents that pass the training filter."""
    _, summary, snap = reference_run
    docs = snap["documents"]
    bank_only = [d for d in docs if d["in_bank"] and not d["in_training"]]
    assert bank_only and all(d["training_reason"] is not None for d in bank_only)
    assert "too_few_words" in {d["training_reason"] for d in bank_only}
    assert all(d["training_reason"] is None for d in docs if d["in_training"])
    assert summary["bank_only_documents"] == len(bank_only)
    assert summary["bank_documents"] == sum(d["in_bank"] for d in docs)
    trained = {d["doc_id"] for d in docs if d["in_training"]}
    in_seqs = {doc for s in snap["train_sequences"] for doc in s["doc_ids"]}
    assert in_seqs and in_seqs <= trained and not in_seqs & {d["doc_id"] for d in bank_only}
    # a record that neither filter keeps is a reject, with the training filter's reason
    assert "too_few_words" in {r["reason"] for r in snap["rejects"]}


def test_without_a_bank_filter_the_bank_keeps_what_training_keeps(corpus, reference_run, tmp_path):
    run_ingest(make_config(corpus, tmp_path / "b", "bank_quality=null"))
    docs = Bank(str(tmp_path / "b")).dataset("documents").to_table(columns=["in_training", "in_bank"]).to_pylist()
    assert docs and all(d["in_training"] and d["in_bank"] for d in docs)
    assert len(docs) < len(reference_run[2]["documents"])


def test_lineage_and_noop_rerun(corpus, reference_run, capsys):
    bank_dir, summary, _ = reference_run
    bank = Bank(str(bank_dir))
    for name in ("documents", "rejects", "refs", "train_sequences"):
        meta = bank.metadata(name)
        assert meta["ingest_key"] == summary["ingest_key"] and meta["config"]["bank"]["uri"] == str(bank_dir)
        assert meta["tokenizer_hash"] and meta["corpus_version"]
    versions = {n: bank.table(n).version for n in ("documents", "refs")}
    again = run_ingest(make_config(corpus, bank_dir))
    assert again["status"] == "up_to_date" and "nothing to do" in capsys.readouterr().out
    assert {n: bank.table(n).version for n in versions} == versions


def test_dedup_does_not_depend_on_sharding_or_partitions(corpus, reference_run, tmp_path):
    _, _, snap = reference_run
    run_ingest(make_config(corpus, tmp_path / "b", "corpus.records_per_shard=1000", "dedup.partitions=1"))
    other = snapshot(tmp_path / "b")
    assert [r["doc_id"] for r in other["documents"]] == [r["doc_id"] for r in snap["documents"]]
    strip = lambda rows: [(r["doc_id"], r["reason"], r["duplicate_of"]) for r in rows]  # noqa: E731
    assert strip(other["rejects"]) == strip(snap["rejects"])


def test_local_tokenizer_file_is_used_as_is(corpus, reference_run, tmp_path):
    bank_dir, _, snap = reference_run
    tok_path = bank_dir / Bank(str(bank_dir)).metadata("refs")["tokenizer_path"]
    run_ingest(make_config(corpus, tmp_path / "b", f"tokenizer.path={tok_path}", "tokenizer.vocab_size=9999"))
    assert Bank(str(tmp_path / "b")).metadata("refs")["tokenizer_hash"] == tok_path.stem
    assert snapshot(tmp_path / "b")["refs"] == snap["refs"]


def run_cli(corpus, bank, env_extra):
    env = dict(os.environ, M3_PROGRESS="0", **env_extra)
    args = [
        sys.executable,
        "-m",
        "jobs",
        "ingest",
        "-c",
        "configs/demo.yaml",
        "--set",
        f"corpus.paths=[{corpus['dir']}/part-0.jsonl.gz]",
        "--set",
        f"bank.uri={bank}",
        "--set",
        "corpus.records_per_shard=60",
        "--set",
        "tokenizer.vocab_size=600",
        "--set",
        "chunking.seq_len=256",
        "--set",
        "ray.num_cpus=2",
    ]
    return subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("crash_at", ["clean:2", "commit:1"])
def test_killed_driver_resumes_without_loss_or_duplication(corpus, reference_run, tmp_path, crash_at):
    bank = tmp_path / "bank"
    proc = run_cli(corpus, bank, {"M3_CRASH_AT": crash_at})
    assert proc.returncode == 75, proc.stderr[-2000:]
    staging = list((bank / "_staging").glob("ingest-*/docs/*.parquet"))
    assert staging  # it died with work done and work left
    summary = run_ingest(make_config(corpus, bank))
    assert summary["accounted"]
    assert snapshot(bank) == reference_run[2]


@pytest.mark.faults
def test_killed_worker_is_retried(corpus, reference_run, tmp_path):
    proc = run_cli(corpus, tmp_path / "bank", {"M3_CRASH_WORKER": str(tmp_path / "crashes")})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len(list((tmp_path / "crashes").glob("*.crashed"))) >= 1
    assert snapshot(tmp_path / "bank") == reference_run[2]


def test_source_roles_bank_only_and_training_only(tmp_path, ray_local):
    """corpus.roles: a knowledge-base file (bank) and a training-text file (training). References
    come only from the bank file, training sequences only from the training file, the report counts
    each role, and changing a role re-decides (a new ingest key)."""
    from pipelines.filters import quality_reason
    from pipelines.normalize import normalize_text

    demo = load_config("configs/demo.yaml")
    recs = foldoc_records(300)
    passes = {
        r["id"]: (
            quality_reason(normalize_text(r["text"]), demo.quality) is None,
            quality_reason(normalize_text(r["text"]), demo.bank_quality) is None,
        )
        for r in recs
    }
    long = [r for r in recs if passes[r["id"]] == (True, True)]
    short = [r for r in recs if passes[r["id"]] == (False, True)]  # the bank's filter keeps them, training's not
    kb, web = tmp_path / "kb.jsonl", tmp_path / "web.jsonl"
    kb_rows, web_rows = long[:20] + short[:10], long[20:60] + short[10:15]
    kb.write_text("".join(json.dumps(r) + "\n" for r in kb_rows))
    web.write_text("".join(json.dumps(r) + "\n" for r in web_rows))
    bank_dir = tmp_path / "bank"

    def ingest(roles):
        cfg = load_config(
            "configs/demo.yaml",
            [
                f"corpus.paths=[{kb}, {web}]",
                "corpus.roles={" + ", ".join(f"{p}: {r}" for p, r in roles.items()) + "}",
                f"bank.uri={bank_dir}",
                "tokenizer.vocab_size=600",
                "chunking.seq_len=256",
                "ray.num_cpus=2",
            ],
        )
        return run_ingest(cfg)

    summary = ingest({kb: "bank", web: "training"})
    bank = Bank(str(bank_dir))
    docs = bank.dataset("documents").to_table().to_pylist()
    source = {d["doc_id"]: d["source"] for d in docs}
    ref_sources = {source[d] for d in bank.dataset("refs").to_table(columns=["doc_id"]).column("doc_id").to_pylist()}
    seq_sources = {
        source[d]
        for ids in bank.dataset("train_sequences").to_table(columns=["doc_ids"]).column("doc_ids").to_pylist()
        for d in ids
    }
    assert ref_sources == {str(kb)} and seq_sources == {str(web)}
    assert all(d["in_bank"] and not d["in_training"] for d in docs if d["source"] == str(kb))
    assert all(d["in_training"] and not d["in_bank"] for d in docs if d["source"] == str(web))
    rejects = bank.dataset("rejects").to_table().to_pylist()
    web_docs = sum(d["source"] == str(web) for d in docs)
    assert {r["source_id"] for r in rejects if r["source"] == str(web)} >= {r["id"] for r in short[10:15]}
    assert summary["by_role"] == {
        "bank": {
            "files": 1,
            "documents": len(kb_rows),
            "in_bank": len(kb_rows),
            "in_training": 0,
            "rejected": sum(r["source"] == str(kb) for r in rejects),
        },
        "training": {
            "files": 1,
            "documents": web_docs,
            "in_bank": 0,
            "in_training": web_docs,
            "rejected": sum(r["source"] == str(web) for r in rejects),
        },
    }
    assert summary["bank_only_documents"] == len(kb_rows) and summary["accounted"]
    report = json.loads((bank_dir / "_reports" / f"ingest-{summary['ingest_key']}.json").read_text())
    assert report["by_role"] == summary["by_role"]

    again = ingest({kb: "bank", web: "both"})  # the web file may now give references too
    assert again.get("status") != "up_to_date" and again["ingest_key"] != summary["ingest_key"]
    assert set(again["by_role"]) == {"bank", "both"} and again["by_role"]["both"]["in_bank"] > 0
    assert again["by_role"]["both"]["documents"] == web_docs + 5  # its short entries join the bank
