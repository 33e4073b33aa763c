"""`m3 rebuild`: incremental by content hash, published as `live` only when whole, retained."""

from __future__ import annotations

import gzip
import json
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import lance
import pytest

from jobs.config import load_config
from jobs.ops.rebuild import run_rebuild
from jobs.stages.encode import run_encode
from storage.bank import Bank
from storage.live import live_versions
from storage.memory_store import MemoryStore
from storage.retention import table_files
from storage.sql import query
from tests.conftest import ROOT, foldoc_records, tiny_settings

pytestmark = pytest.mark.slow

RECORDS = foldoc_records(36, min_words=40)


def write_corpus(path: Path, records: list[dict]) -> Path:
    with gzip.open(path, "wt", encoding="utf-8") as f:
        for rec in records:
            f.write(json.dumps(rec) + "\n")
    return path


def edited(records: list[dict], generation: int) -> list[dict]:
    """The base corpus with one entry changed, one removed and one added per generation."""
    out = [dict(r) for r in records[:30]]
    out[generation]["text"] += f" This entry was revised in generation {generation} of the corpus."
    del out[10 + generation]
    return out + [records[30 + generation]]


def memories_by_ref(bank: Path, version: int | None = None) -> dict[str, bytes]:
    ds = lance.dataset(str(bank / "memories.lance"), version=version)
    t = ds.to_table(columns=["ref_id", "payload"])
    return dict(zip(t.column("ref_id").to_pylist(), t.column("payload").to_pylist()))


def live_consistent(bank: Path) -> tuple[int, dict]:
    """What a reader sees through `live`: refs, memories and embeddings of one build."""
    b = Bank(str(bank), live=True)
    refs = b.dataset("refs").to_table(columns=["ref_id", "content_hash"])
    mem = b.dataset("memories").to_table(columns=["ref_id", "content_hash"])
    emb = b.dataset("embeddings").to_table(columns=["ref_id", "content_hash"])
    pairs = lambda t: set(zip(t.column("ref_id").to_pylist(), t.column("content_hash").to_pylist()))  # noqa: E731
    assert pairs(refs) == pairs(mem) == pairs(emb), "live refs, memories and embeddings disagree"
    n_sql = query(b, "SELECT count(*) FROM refs JOIN memories USING (ref_id, content_hash)")[1][0][0]
    assert n_sql == refs.num_rows
    store = MemoryStore(b, b.metadata("memories")["model_hash"])
    assert len(store) == refs.num_rows
    store.fetch(refs.column("ref_id").to_pylist()[:3])
    return refs.num_rows, b.pins


@pytest.fixture(scope="module")
def built(tmp_path_factory, ray_local):
    """A bank after a first (full) rebuild and a second, incremental one."""
    root = tmp_path_factory.mktemp("rebuild")
    corpus, bank = root / "c.jsonl.gz", root / "bank"
    write_corpus(corpus, edited(RECORDS, 0))
    overrides = tiny_settings(corpus, bank)
    first = run_rebuild(load_config("configs/demo.yaml", overrides))
    v1 = live_versions(Bank(str(bank)))
    old = memories_by_ref(bank)
    write_corpus(corpus, edited(RECORDS, 1))
    second = run_rebuild(load_config("configs/demo.yaml", overrides))
    return root, corpus, bank, overrides, first, second, v1, old


def test_first_rebuild_builds_everything_and_publishes_live(built):
    root, corpus, bank, overrides, first, second, v1, old = built
    assert first["status"] == "published" and first["changed"] == first["removed"] == 0 and first["added"] > 0
    assert set(v1) == {"documents", "rejects", "refs", "train_sequences", "memories", "embeddings"}
    assert Bank(str(bank)).tags("memories")["live"] == live_versions(Bank(str(bank)))["memories"]
    live_consistent(bank)


def test_second_rebuild_encodes_only_new_and_changed_references(built):
    root, corpus, bank, overrides, first, second, v1, old = built
    mem = second["memories"]
    assert second["status"] == "published"
    assert mem["added"] > 0 and mem["changed"] > 0 and mem["removed"] > 0, mem
    # only the edited entries moved: the rest were copied
    assert mem["added"] + mem["changed"] < mem["unchanged"] / 5, mem
    assert second["embeddings"]["added"] == mem["added"] and second["embeddings"]["removed"] == mem["removed"]
    new = memories_by_ref(bank)
    kept = set(new) & set(old)
    # a copied row is byte for byte the old one
    assert sum(new[r] == old[r] for r in kept) >= mem["unchanged"]
    live_consistent(bank)


def data_files(bank: Path, table: str, version: int) -> dict[str, int]:
    """The data files a table version reads: {path: rows it keeps of the file}."""
    ds = lance.dataset(str(bank / f"{table}.lance"), version=version)
    return {f.data_files()[0].path: f.count_rows() for f in ds.get_fragments()}


@pytest.mark.parametrize("table", ["memories", "embeddings"])
def test_an_incremental_rebuild_shares_the_files_of_the_build_before(built, table):
    """The second build's version keeps the first build's data files (their rows that changed or
    went away get deletion vectors) and adds files holding only the rows it computed."""
    root, corpus, bank, overrides, first, second, v1, old = built
    before = data_files(bank, table, v1[table])
    after = data_files(bank, table, live_versions(Bank(str(bank)))[table])
    counts = second[table]
    shared, new = set(after) & set(before), set(after) - set(before)
    assert shared == set(before), (before, after)  # every file of the first build is still read
    assert sum(after[f] for f in new) == counts["added"] + counts["changed"], (after, counts)
    assert sum(before.values()) - sum(after[f] for f in shared) == counts["changed"] + counts["removed"]


@pytest.mark.parametrize("table", ["refs", "documents"])
def test_an_incremental_ingest_shares_files_and_equals_a_fresh_one(built, tmp_path, table):
    """Ingest's tables are updated too: the rows already there stay in the first build's files,
    and the table holds exactly the rows a fresh ingest of the same corpus writes."""
    from jobs.stages.ingest import run_ingest

    root, corpus, bank, overrides, first, second, v1, old = built
    live = live_versions(Bank(str(bank)))[table]
    before, after = data_files(bank, table, v1[table]), data_files(bank, table, live)
    assert set(before) <= set(after) and sum(after[f] for f in before) > 0, (before, after)
    fresh = tmp_path / "fresh"
    tokenizer = bank / Bank(str(bank), live=True).metadata("refs")["tokenizer_path"]  # the rebuild's pinned BPE
    run_ingest(load_config("configs/demo.yaml", tiny_settings(corpus, fresh, f"tokenizer.path={tokenizer}")))
    columns = [c for c in lance.dataset(str(fresh / f"{table}.lance")).schema.names]

    def rows(path: Path, version: int | None = None) -> list:
        t = lance.dataset(str(path / f"{table}.lance"), version=version).to_table(columns=columns)
        return sorted(map(repr, t.to_pylist()))

    assert rows(bank, live) == rows(fresh)


def test_builds_that_share_files_read_and_diff_as_before(built):
    """`m3 sql --build 1`, `m3 bank diff 1 live` and the builds view over builds whose versions
    share files: each build reads its own rows, the diff is what the rebuild reported."""
    from storage.builds import pinned_bank
    from storage.diff import diff_builds

    root, corpus, bank, overrides, first, second, v1, old = built
    b = Bank(str(bank))
    one, live = pinned_bank(b, build=1), pinned_bank(b, build="live")
    assert (
        query(one, "SELECT count(*) FROM memories")[1][0][0]
        == lance.dataset(str(bank / "memories.lance"), version=v1["memories"]).count_rows()
    )
    assert query(live, "SELECT count(*) FROM memories")[1][0][0] == live.dataset("refs").count_rows()
    d = diff_builds(b, 1, "live")
    mem = second["memories"]
    assert (d["memories"]["new"], d["memories"]["removed"]) == (mem["added"], mem["removed"]), (d, mem)
    assert d["memories"]["changed"] == mem["changed"] and d["memories"]["unchanged"] == mem["unchanged"]
    rows = query(b, "SELECT build, refs_rows, memories_rows, bytes FROM builds ORDER BY build")[1]
    assert [r[2] for r in rows] == [len(old), live.dataset("memories").count_rows()] and all(r[3] for r in rows)


def test_incremental_bank_equals_a_full_encode(built, tmp_path):
    root, corpus, bank, overrides, *_ = built
    full = tmp_path / "full"
    shutil.copytree(bank, full)
    shutil.rmtree(full / "memories.lance")
    run_encode(load_config("configs/demo.yaml", tiny_settings(corpus, full)))
    assert memories_by_ref(full) == memories_by_ref(bank)


def test_nothing_changed_is_no_work(built, capsys):
    root, corpus, bank, overrides, *_ = built
    before = live_versions(Bank(str(bank)))
    summary = run_rebuild(load_config("configs/demo.yaml", overrides))
    assert summary["status"] == "up_to_date" and live_versions(Bank(str(bank))) == before
    assert "nothing to do" in capsys.readouterr().out


def test_new_model_reencodes_everything(built, tmp_path):
    root, corpus, bank, overrides, *_ = built
    copy = tmp_path / "bank"
    shutil.copytree(bank, copy)
    summary = run_rebuild(
        load_config("configs/demo.yaml", tiny_settings(corpus, copy, "encode.seed=1", "rebuild.embeddings=false"))
    )
    mem = summary["memories"]
    assert mem["unchanged"] == 0 and mem["changed"] == Bank(str(copy)).dataset("refs").count_rows()


def test_reader_never_sees_a_killed_rebuild(built, tmp_path):
    """A reader loops over the live build while a rebuild is killed before publishing and run
    again: every read is of one whole build, first the old one, then the new one."""
    root, corpus, bank, overrides, *_ = built
    b2 = tmp_path / "bank"
    shutil.copytree(bank, b2)
    corpus2 = write_corpus(tmp_path / "c.jsonl.gz", edited(RECORDS, 2))
    over = tiny_settings(corpus2, b2)
    seen, errors, stop = [], [], threading.Event()

    def reader():
        while not stop.is_set():
            try:
                seen.append(live_consistent(b2)[1]["memories"])
            except Exception as e:  # noqa: BLE001 - recorded, asserted below
                errors.append(repr(e))
                return

    old_live = live_versions(Bank(str(b2)))
    t = threading.Thread(target=reader)
    t.start()
    try:
        env = {**os.environ, "M3_CRASH_AT": "publish:1", "M3_PROGRESS": "0"}
        args = [sys.executable, "-m", "jobs", "rebuild", "-c", "configs/demo.yaml"]
        for o in over:
            args += ["--set", o]
        killed = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
        assert killed.returncode == 75, killed.stderr[-2000:]
        assert live_versions(Bank(str(b2))) == old_live  # the half-finished build is not live
        assert Bank(str(b2)).table("memories").version > old_live["memories"]  # but it was written
        summary = run_rebuild(load_config("configs/demo.yaml", over))
        n_published = len(seen)  # reads finished before the new build was live (or during)
        while len(seen) < n_published + 2 and not errors:
            stop.wait(0.05)  # the first may have started before publishing; the second did not
    finally:
        stop.set()
        t.join()
    assert not errors, errors
    assert summary["memories"]["status"] == "up_to_date"  # resumed: the killed run's memories were kept
    assert summary["status"] == "published"
    assert set(seen) == {old_live["memories"], live_versions(Bank(str(b2)))["memories"]}


def test_retention_keeps_the_bank_from_growing(built, tmp_path, monkeypatch):
    """Retention removes old versions; the fragments an incremental rebuild adds to memories,
    refs and documents (shared with the builds before) are merged once there are more than
    MAX_FRAGMENTS (2 here, 16 by default), so the tables' files stop growing."""
    import jobs.ops.rebuild as rebuild_mod

    monkeypatch.setattr(rebuild_mod, "MAX_FRAGMENTS", 2)
    root, corpus, bank, overrides, *_ = built
    b3 = tmp_path / "bank"
    shutil.copytree(bank, b3)
    c3 = tmp_path / "c.jsonl.gz"
    files, fragments = [], []
    for gen in range(2, 6):
        write_corpus(c3, edited(RECORDS, gen))
        run_rebuild(
            load_config("configs/demo.yaml", tiny_settings(c3, b3, "rebuild.keep_builds=2", "rebuild.embeddings=false"))
        )
        files.append({t: table_files(Bank(str(b3)), t) for t in ("refs", "memories", "documents")})
        live = Bank(str(b3), live=True)
        fragments.append({t: len(live.dataset(t).get_fragments()) for t in ("refs", "memories", "documents")})
    for table in ("refs", "memories", "documents"):  # rebuilds added fragments, then they were merged
        counts = [f[table] for f in fragments]
        assert max(counts) <= 2 and counts != [1] * len(counts), (table, fragments)
    for table in ("refs", "memories", "documents"):
        versions = [v["version"] for v in lance.dataset(str(b3 / f"{table}.lance")).versions()]
        assert len(versions) == 2, (table, versions)  # the two newest builds, nothing older
    # steady state: a rebuild adds as many files as it removes (memories: over a merge cycle)
    assert files[-1] == files[-3], files
    live_consistent_no_embeddings = Bank(str(b3), live=True)
    assert (
        live_consistent_no_embeddings.dataset("memories").count_rows()
        == live_consistent_no_embeddings.dataset("refs").count_rows()
    )


def test_rebuild_killed_mid_encode_resumes_without_loss_or_duplication(built, tmp_path):
    """A new model re-encodes every reference in 2 shards through the actor pool; the rebuild
    is killed after the first shard and run again: one memory per reference, equal to a clean
    full encode with that model."""
    root, corpus, bank, overrides, *_ = built
    b4 = tmp_path / "bank"
    shutil.copytree(bank, b4)
    over = tiny_settings(corpus, b4, "encode.seed=2", "rebuild.embeddings=false")
    args = [sys.executable, "-m", "jobs", "rebuild", "-c", "configs/demo.yaml"]
    for o in over:
        args += ["--set", o]
    killed = subprocess.run(
        args,
        cwd=ROOT,
        env={**os.environ, "M3_CRASH_AT": "encode:1", "M3_PROGRESS": "0"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert killed.returncode == 75, killed.stderr[-2000:]
    staged = list((b4 / "_staging").glob("encode-*/shards/*.parquet"))
    assert len(staged) >= 1  # the finished shard is kept for the rerun
    summary = run_rebuild(load_config("configs/demo.yaml", over))
    assert summary["status"] == "published"
    ids = lance.dataset(str(b4 / "memories.lance")).to_table(columns=["ref_id"]).column("ref_id").to_pylist()
    assert len(ids) == len(set(ids)) == Bank(str(b4)).dataset("refs").count_rows()
    full = tmp_path / "full"
    shutil.copytree(b4, full)
    shutil.rmtree(full / "memories.lance")
    run_encode(load_config("configs/demo.yaml", tiny_settings(corpus, full, "encode.seed=2")))
    assert memories_by_ref(full) == memories_by_ref(b4)


# -- what a rebuild publishes (issue 27) ------------------------------------------------------


def foreign_refs(bank: Path, n: int = 3) -> int:
    """A writer that takes no lock (what `m3 ingest` of another corpus was): a new refs version
    of n rows, written with lance directly. Returns its version."""
    uri = str(bank / "refs.lance")
    return lance.write_dataset(lance.dataset(uri).to_table().slice(0, n), uri, mode="overwrite").version


def test_rebuild_publishes_the_versions_it_built_not_a_later_write(built, tmp_path, monkeypatch):
    """refs written by someone else after the rebuild's stages read theirs: the rebuild publishes
    its own refs version (before: the latest, beside memories of another refs: 0 references with
    a memory)."""
    import jobs.stages.embed

    root, corpus, bank, overrides, *_ = built
    b = tmp_path / "bank"
    shutil.copytree(bank, b)
    c = write_corpus(tmp_path / "c.jsonl.gz", edited(RECORDS, 2))
    real, foreign = jobs.stages.embed.run_embed, []

    def embed_then_a_foreign_write(cfg, **kw):
        out = real(cfg, **kw)
        foreign.append(foreign_refs(b))
        return out

    monkeypatch.setattr(jobs.stages.embed, "run_embed", embed_then_a_foreign_write)
    summary = run_rebuild(load_config("configs/demo.yaml", tiny_settings(c, b)))
    live = live_versions(Bank(str(b)))
    assert summary["status"] == "published" and live == summary["versions"] and live["refs"] < foreign[0]
    assert live_consistent(b)[0] > 3


def test_rebuild_refuses_when_refs_change_under_its_stages(built, tmp_path, monkeypatch):
    """refs replaced between the rebuild's ingest and its encode: memories and embeddings of
    another refs version are not published beside the ingest's tables."""
    import jobs.stages.encode
    from model.errors import M3Error

    root, corpus, bank, overrides, *_ = built
    b = tmp_path / "bank"
    shutil.copytree(bank, b)
    c = write_corpus(tmp_path / "c.jsonl.gz", edited(RECORDS, 3))
    real = jobs.stages.encode.run_encode

    def a_foreign_write_then_encode(cfg, **kw):
        foreign_refs(b)
        return real(cfg, **kw)

    monkeypatch.setattr(jobs.stages.encode, "run_encode", a_foreign_write_then_encode)
    before = live_versions(Bank(str(b)))
    with pytest.raises(
        M3Error,
        match=r"refs changed during this rebuild: .*memories were built from refs version .*nothing was published",
    ):
        run_rebuild(load_config("configs/demo.yaml", tiny_settings(c, b, "rebuild.embeddings=false")))
    assert live_versions(Bank(str(b))) == before


def test_rebuild_of_a_cut_corpus_refuses_to_shrink_the_live_build(built, tmp_path, capsys):
    """A half-downloaded corpus (10 % of it): the rebuild refuses to publish, exit 2, one line;
    the live build and every version retention would have deleted stay. --allow-shrink publishes."""
    from jobs.cli.main import main

    root, corpus, bank, overrides, *_ = built
    b = tmp_path / "bank"
    shutil.copytree(bank, b)
    c = write_corpus(tmp_path / "c.jsonl.gz", edited(RECORDS, 1)[:3])
    before = live_versions(Bank(str(b)))
    n_live = Bank(str(b), live=True).dataset("refs").count_rows()
    kept = {t: {v["version"] for v in lance.dataset(str(b / f"{t}.lance")).versions()} for t in before}
    args = ["rebuild", "-c", "configs/demo.yaml"]
    for o in tiny_settings(c, b, "rebuild.keep_builds=1"):
        args += ["--set", o]
    capsys.readouterr()
    assert main(args) == 2
    err = capsys.readouterr().err
    n_new = Bank(str(b)).dataset("refs").count_rows()
    assert 0 < n_new < n_live / 5
    assert err.count("\n") == 1 and err.startswith("m3 rebuild: error: "), err
    assert f"the live build has {n_live} references, this one would have {n_new}" in err, err
    assert "nothing was published" in err and "--allow-shrink" in err, err
    assert live_versions(Bank(str(b))) == before
    for t, versions in kept.items():  # retention did not run
        assert versions <= {v["version"] for v in lance.dataset(str(b / f"{t}.lance")).versions()}, t
    assert main(args + ["--allow-shrink"]) == 0
    assert Bank(str(b), live=True).dataset("refs").count_rows() == n_new
    assert live_consistent_refs_memories(b)


def live_consistent_refs_memories(bank: Path) -> bool:
    b = Bank(str(bank), live=True)
    pairs = lambda t: set(zip(t.column("ref_id").to_pylist(), t.column("content_hash").to_pylist()))  # noqa: E731
    return pairs(b.dataset("refs").to_table(columns=["ref_id", "content_hash"])) == pairs(
        b.dataset("memories").to_table(columns=["ref_id", "content_hash"])
    )


# -- retrieval.method bm25: the full-text index is part of each published build (storage/lexical.py)

INVENTED = {
    "id": "sumthe-munkrai",
    "text": "Sumthe Munkrai is a made-up cartographer born in Kriasu in 1631, "
    "remembered for a map of the river Geherro and for playing the harp.",
}


@pytest.fixture(scope="module")
def bm25_builds(tmp_path_factory, ray_local):
    """Build 1 of a bank served by BM25, then build 2: the same corpus and one more entry, about
    an invented name."""
    root = tmp_path_factory.mktemp("rebuild-bm25")
    corpus, bank = root / "c.jsonl.gz", root / "bank"
    overrides = tiny_settings(corpus, bank, "retrieval.method=bm25")
    write_corpus(corpus, RECORDS[:30])
    run_rebuild(load_config("configs/demo.yaml", overrides))
    write_corpus(corpus, RECORDS[:30] + [INVENTED])
    second = run_rebuild(load_config("configs/demo.yaml", overrides))
    return load_config("configs/demo.yaml", overrides), overrides, second


def test_a_rebuild_indexes_the_new_reference_for_bm25(bm25_builds, capsys):
    from jobs.stages.embed import search_text
    from storage.lexical import fts_info

    cfg, overrides, second = bm25_builds
    assert second["status"] == "published" and second["embeddings"]["added"] == 1
    live = Bank(cfg.bank.uri, live=True)
    info = fts_info(live.table("embeddings"))  # the published version is the indexed one
    assert info["indexed_rows"] == live.dataset("refs").count_rows() and info["unindexed_rows"] == 0
    hits = search_text(cfg, "Who was Sumthe Munkrai?", k=3, bank=live)
    assert hits[0]["ref_id"].startswith(hits[0]["doc_id"]) and "Sumthe Munkrai" in hits[0]["text"]
    args = ["search", "-c", "configs/demo.yaml", *[x for o in overrides for x in ("--set", o)], "-k", "3"]
    assert main_cli([*args, "--build", "2", "Sumthe Munkrai"]) == 0
    assert "Sumthe Munkrai" in capsys.readouterr().out
    capsys.readouterr()
    assert run_rebuild(cfg)["status"] == "up_to_date"  # the index is part of the build: nothing to do
    assert "nothing to do" in capsys.readouterr().out


def test_a_pinned_older_build_does_not_find_a_reference_added_later(bm25_builds, capsys):
    from jobs.stages.embed import search_text
    from storage.builds import pinned_bank

    cfg, overrides, _ = bm25_builds
    old, new = pinned_bank(Bank.of(cfg), 1), pinned_bank(Bank.of(cfg), 2)
    # each build's embeddings version carries its own index, over its own references
    assert fts_rows(old) == old.dataset("refs").count_rows() == fts_rows(new) - 1
    assert all("Sumthe" not in h["text"] for h in search_text(cfg, "Sumthe Munkrai", k=3, bank=old))
    assert any("Sumthe" in h["text"] for h in search_text(cfg, "Sumthe Munkrai", k=3, bank=new))
    args = ["search", "-c", "configs/demo.yaml", *[x for o in overrides for x in ("--set", o)], "-k", "3"]
    capsys.readouterr()
    assert main_cli([*args, "--build", "1", "Sumthe Munkrai"]) == 0
    assert "Sumthe" not in capsys.readouterr().out


def fts_rows(bank: Bank) -> int:
    from storage.lexical import fts_info

    return fts_info(bank.table("embeddings"))["indexed_rows"]


def main_cli(argv: list[str]) -> int:
    from jobs.cli.main import main

    return main(argv)
