"""Incremental ingest: the per-record memo (pipelines/memo.py) never changes a result.

A bank is built, ~4 % of its records are edited (one edit makes a new exact duplicate, so the
global dedup decisions change too), and the edited corpus is ingested into that bank with its
memo and, from scratch, into an empty one: every table must come out row for row the same.
"""

from __future__ import annotations

import gzip
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from jobs.config import load_config
from jobs.stages.ingest import memo_keys, run_ingest
from pipelines import memo
from pipelines.normalize import normalize_text
from storage.bank import Bank
from storage.layout import BankLayout
from tests.conftest import ROOT, foldoc_records

pytestmark = pytest.mark.slow

BAD_LINES = [b"{not json", b'{"text": "caf\xe9 au lait"}', b'{"id": "no-text"}', b""]
SETTINGS = ["corpus.records_per_shard=60", "tokenizer.vocab_size=600", "chunking.seq_len=256", "ray.num_cpus=2"]
KEYS = {"documents": "doc_id", "rejects": "doc_id", "refs": "ref_id", "train_sequences": "seq_id"}


def write_corpus(folder: Path, recs: list[dict]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps(r).encode() for r in recs[:100]] + BAD_LINES + [json.dumps(r).encode() for r in recs[100:]]
    # the same file name in every version: doc ids are derived from it
    with gzip.open(folder / "part-0.jsonl.gz", "wb") as f:
        f.write(b"\n".join(lines) + b"\n")
    return folder / "part-0.jsonl.gz"


def edit(recs: list[dict]) -> tuple[list[dict], list[str]]:
    """Every 25th record gets a sentence appended, and one becomes a copy of another's text."""
    out = [dict(r, text=r["text"] + " This entry was revised.") if i % 25 == 3 else dict(r) for i, r in enumerate(recs)]
    long = [i for i, r in enumerate(out) if len(r["text"].split()) >= 150]
    out[long[-1]]["text"] = out[long[0]]["text"]  # a new exact duplicate: dedup's winners change
    return out, [r["id"] for r, old in zip(out, recs) if r["text"] != old["text"]]


def config(corpus: Path, bank: Path, *extra: str):
    return load_config("configs/demo.yaml", [f"corpus.paths=[{corpus}]", f"bank.uri={bank}", *SETTINGS, *extra])


def snapshot(uri: Path) -> dict:
    bank = Bank(str(uri))
    return {
        name: sorted(bank.dataset(name).to_table().to_pylist(), key=lambda r: (r[key], r.get("reason") or ""))
        for name, key in KEYS.items()
    }


@pytest.fixture(scope="module")
def builds(tmp_path_factory, ray_local):
    """v1 built into `incremental` (which then holds v1's memo), a pinned tokenizer, and v2 (the
    edited corpus) built from scratch into `scratch` with that tokenizer."""
    root = tmp_path_factory.mktemp("memo")
    recs = foldoc_records(300)
    v2_recs, edited = edit(recs)
    v1, v2 = write_corpus(root / "v1", recs), write_corpus(root / "v2", v2_recs)
    first = run_ingest(config(v1, root / "incremental"))
    bank = Bank(str(root / "incremental"))
    tokenizer = BankLayout(str(root / "incremental")).path(bank.metadata("refs")["tokenizer_path"])
    scratch = run_ingest(config(v2, root / "scratch", f"tokenizer.path={tokenizer}"))
    return {
        "root": root,
        "v1": v1,
        "v2": v2,
        "tokenizer": tokenizer,
        "edited": edited,
        "v2_recs": v2_recs,
        "first": first,
        "scratch": scratch,
        "expected": snapshot(root / "scratch"),
    }


def incremental_bank(builds, name: str) -> Path:
    """A copy of the bank built from v1 (tables and memo), to rebuild with v2."""
    bank = builds["root"] / name
    shutil.copytree(builds["root"] / "incremental", bank)
    return bank


def test_a_full_build_takes_nothing_from_a_memo(builds):
    assert builds["first"]["memo_clean_hits"] == 0 and builds["first"]["memo_chunk_hits"] == 0
    assert builds["scratch"]["memo_clean_hits"] == 0 and builds["scratch"]["memo_chunk_hits"] == 0


def test_incremental_build_equals_a_build_from_scratch(builds):
    bank = incremental_bank(builds, "incr")
    summary = run_ingest(config(builds["v2"], bank, f"tokenizer.path={builds['tokenizer']}"))
    assert snapshot(bank) == builds["expected"]
    # only the edited records were cleaned again; every kept unchanged document was cut from the memo
    v1_texts = {r["text"] for r in foldoc_records(300)}
    assert summary["memo_clean_hits"] == sum(r["text"] in v1_texts for r in builds["v2_recs"])
    assert summary["memo_clean_hits"] <= len(builds["v2_recs"]) - len(builds["edited"]) + 1
    kept = len(builds["expected"]["documents"])
    assert kept - len(builds["edited"]) <= summary["memo_chunk_hits"] < kept


def test_the_memo_holds_the_current_corpus_only(builds):
    bank = incremental_bank(builds, "bounded")
    run_ingest(config(builds["v2"], bank, f"tokenizer.path={builds['tokenizer']}"))
    root = BankLayout(str(bank)).memo()
    current = json.loads((root / "current.json").read_text())
    assert sorted(p.name for p in root.iterdir()) == sorted(["current.json", current["build"]])
    src = memo.source(Bank(str(bank)), "clean", memo_keys(config(builds["v2"], bank))["clean"])
    v1 = {r["id"]: r["text"] for r in foldoc_records(300)}
    v2 = {r["id"]: r["text"] for r in builds["v2_recs"]}
    old = [memo.text_key(v1[i]) for i in builds["edited"] if v1[i] not in v2.values()]
    new = [memo.text_key(v2[i]) for i in builds["edited"]]
    assert old and not memo.lookup(src, old, ["text"])  # records no longer in the corpus are gone
    found = memo.lookup(src, new, ["text"])
    assert {v["text"] for v in found.values()} == {normalize_text(v2[i]) for i in builds["edited"]}


def test_a_memo_of_another_config_is_not_used(builds):
    bank = incremental_bank(builds, "other")
    extra = (f"tokenizer.path={builds['tokenizer']}", "quality.min_words=40", "chunking.ref_max_tokens=96")
    summary = run_ingest(config(builds["v2"], bank, *extra))
    assert summary["memo_clean_hits"] == 0 and summary["memo_chunk_hits"] == 0
    scratch = builds["root"] / "other-scratch"
    run_ingest(config(builds["v2"], scratch, *extra))
    assert snapshot(bank) == snapshot(scratch)
    assert snapshot(bank) != builds["expected"]  # the settings do change the tables


def run_cli(corpus: Path, bank: Path, tokenizer: Path, env_extra: dict) -> subprocess.CompletedProcess:
    env = dict(os.environ, **env_extra)
    args = [
        sys.executable,
        "-m",
        "jobs",
        "ingest",
        "-c",
        "configs/demo.yaml",
        "--set",
        f"corpus.paths=[{corpus}]",
        "--set",
        f"bank.uri={bank}",
        "--set",
        f"tokenizer.path={tokenizer}",
    ]
    for s in SETTINGS:
        args += ["--set", s]
    return subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("crash_at", ["chunk:2", "commit:1"])
def test_killed_incremental_build_resumes_without_loss_or_duplication(builds, crash_at):
    bank = incremental_bank(builds, f"crash-{crash_at.replace(':', '-')}")
    before = (BankLayout(str(bank)).memo() / "current.json").read_text()
    proc = run_cli(builds["v2"], bank, builds["tokenizer"], {"M3_CRASH_AT": crash_at})
    assert proc.returncode == 75, proc.stderr[-2000:]
    # the memo being read is untouched until the new build's tables are committed
    assert (BankLayout(str(bank)).memo() / "current.json").read_text() == before
    summary = run_ingest(config(builds["v2"], bank, f"tokenizer.path={builds['tokenizer']}"))
    assert summary["accounted"]
    assert snapshot(bank) == builds["expected"]
