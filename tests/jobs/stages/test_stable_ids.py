"""Stable ids (issue 14): inserting, removing or editing one document of the corpus changes only
that document's rows of documents, rejects and refs, through the real ingest with a pinned
tokenizer (as `m3 rebuild` pins it). Shards are small, so the change also moves every later
shard boundary: nothing of a reference may depend on where its shard starts.

train_sequences are not stable and are not meant to be: they pack the token streams of
consecutive documents, so a change moves the packing of every later document of its shard.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from jobs.config import load_config
from jobs.stages.ingest import run_ingest
from storage.bank import Bank
from storage.layout import BankLayout
from tests.conftest import foldoc_records

pytestmark = pytest.mark.slow

SETTINGS = ["corpus.records_per_shard=25", "tokenizer.vocab_size=600", "chunking.seq_len=256", "ray.num_cpus=2"]


def build(root: Path, name: str, recs: list[dict], *extra: str) -> dict:
    corpus = root / "corpus" / "part-0.jsonl.gz"  # one corpus file, as edited between builds
    corpus.parent.mkdir(exist_ok=True)
    with gzip.open(corpus, "wt", encoding="utf-8") as f:
        for r in recs:
            f.write(json.dumps(r) + "\n")
    bank = root / name
    run_ingest(load_config("configs/demo.yaml", [f"corpus.paths=[{corpus}]", f"bank.uri={bank}", *SETTINGS, *extra]))
    b = Bank(str(bank))
    tables = {name: b.dataset(name).to_table().to_pylist() for name in ("documents", "rejects", "refs")}
    for rows in tables.values():
        for r in rows:
            r.pop("rank", None)  # the corpus position: it moves when a record is inserted before it
    return {"bank": bank, "meta": b.metadata("refs"), **tables}


def rows_by_doc(snap: dict, table: str) -> dict[str, list]:
    out: dict[str, list] = {}
    for r in snap[table]:
        out.setdefault(r["doc_id"], []).append(r)
    return {d: sorted(rows, key=lambda r: json.dumps(r, sort_keys=True, default=str)) for d, rows in out.items()}


def doc_of(snap: dict, source_id: str) -> str:
    return next(r["doc_id"] for r in snap["documents"] + snap["rejects"] if r["source_id"] == source_id)


@pytest.fixture(scope="module")
def variants(tmp_path_factory, ray_local):
    root = tmp_path_factory.mktemp("stable")
    recs = foldoc_records(130)
    # a long entry from further on (training text and references), not a copy of any of them
    extra = next(r for r in foldoc_records(1000)[130:] if len(r["text"].split()) >= 150)
    long = [i for i, r in enumerate(recs) if len(r["text"].split()) >= 150]
    first = build(root, "tokenizer", recs)  # trains the tokenizer every variant then pins
    tok = BankLayout(str(first["bank"])).path(first["meta"]["tokenizer_path"])
    pin = f"tokenizer.path={tok}"
    inserted = dict(extra, id="inserted")
    edited = [dict(r, text=r["text"] + " Revised in this version.") if i == long[2] else r for i, r in enumerate(recs)]
    return {
        "base": build(root, "base", recs, pin),
        "insert": (build(root, "insert", recs[:30] + [inserted] + recs[30:], pin), "inserted"),
        "remove": (build(root, "remove", recs[: long[1]] + recs[long[1] + 1 :], pin), recs[long[1]]["id"]),
        "edit": (build(root, "edit", edited, pin), recs[long[2]]["id"]),
    }


@pytest.mark.parametrize("change", ["insert", "remove", "edit"])
def test_one_changed_document_changes_only_its_own_rows(variants, change):
    base = variants["base"]
    snap, source_id = variants[change]
    changed = doc_of(snap if change == "insert" else base, source_id)
    for table in ("documents", "rejects", "refs"):
        before, after = rows_by_doc(base, table), rows_by_doc(snap, table)
        others = (set(before) | set(after)) - {changed}
        assert others
        assert {d: before.get(d) for d in others} == {d: after.get(d) for d in others}, table
    refs_before, refs_after = rows_by_doc(base, "refs").get(changed, []), rows_by_doc(snap, "refs").get(changed, [])
    if change == "insert":
        assert not refs_before and refs_after
    elif change == "remove":
        assert refs_before and not refs_after
    else:  # the edit appended a sentence: the document's last reference is another one
        assert refs_before and refs_after and refs_before != refs_after
        assert {r["ref_id"] for r in refs_before} <= {r["ref_id"] for r in refs_after}
