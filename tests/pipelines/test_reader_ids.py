"""Document ids survive moving the corpus (issue 14, stable ids): a text file's id is its path
below the folder or glob that corpus.paths names, not its full path; a JSONL record's is its id."""

from __future__ import annotations

import json
import shutil

from pipelines.readers import count_records, expand_paths, plan_shards, read_shard
from tests.conftest import foldoc_records


def doc_ids(pattern: str) -> dict[str, str]:
    files = expand_paths([pattern])
    counts = [count_records(f, 1 << 20)[0] for f in files]
    return {r.source_id: r.doc_id for s in plan_shards(files, counts, 4) for r in read_shard(s, files)}


def make_text_corpus(root):
    for i, rec in enumerate(foldoc_records(6)):
        sub = root / ("a" if i % 2 else "b")
        sub.mkdir(parents=True, exist_ok=True)
        (sub / f"{i // 2}.txt").write_text(rec["text"])  # a/0.txt and b/0.txt: same name, other folder


def test_a_moved_text_corpus_keeps_its_doc_ids(tmp_path):
    make_text_corpus(tmp_path / "here" / "docs")
    before = doc_ids(str(tmp_path / "here" / "docs"))
    assert sorted(before) == ["a/0.txt", "a/1.txt", "a/2.txt", "b/0.txt", "b/1.txt", "b/2.txt"]
    assert len(set(before.values())) == 6  # same file name in two folders: two documents
    shutil.move(tmp_path / "here", tmp_path / "elsewhere")
    assert doc_ids(str(tmp_path / "elsewhere" / "docs")) == before
    assert doc_ids(str(tmp_path / "elsewhere" / "docs" / "**" / "*.txt")) == before


def test_a_moved_jsonl_corpus_keeps_its_doc_ids(tmp_path):
    recs = foldoc_records(5)
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "c.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    before = doc_ids(str(tmp_path / "x" / "c.jsonl"))
    shutil.move(tmp_path / "x", tmp_path / "y")
    assert doc_ids(str(tmp_path / "y" / "c.jsonl")) == before
    assert sorted(before) == sorted(r["id"] for r in recs)
