"""`m3 rebuild` on a bank at an s3:// URI (the S3 server of the `s3` fixture, tests/conftest.py):
a full rebuild, then an incremental one after the corpus changed, with retention
(rebuild.keep_builds=1) and compaction (rebuild.compact_after), publish the same live build as
the same two rebuilds of a bank at a local path. Both run in this process (the suite's Ray
started with the S3 endpoint in its workers' environment: tests/conftest.py); `m3 rebuild`
itself runs once, for its refusal of a held lock. The model to encode with stays on local disk (a bank on an object store
keeps no models: storage/layout.py)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from jobs.config import load_config
from jobs.ops.lock import BankLock
from jobs.ops.rebuild import run_rebuild
from storage.bank import Bank
from storage.conditional import read_versioned
from storage.live import read_manifest
from tests.conftest import ROOT, tiny_settings
from tests.jobs.ops.test_rebuild import RECORDS, edited, write_corpus

pytestmark = pytest.mark.slow

TABLES = {
    "documents": "doc_id",
    "rejects": None,
    "refs": "ref_id",
    "train_sequences": "seq_id",
    "memories": "ref_id",
    "embeddings": "ref_id",
}


def m3(args: list[str], sets: list[str], env: dict, summary=None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "jobs", *args, "-c", "configs/demo.yaml"]
    for s in sets + ["ray.include_dashboard=false"]:
        cmd += ["--set", s]
    extra = {"M3_RUN_SUMMARY": str(summary)} if summary else {}
    return subprocess.run(
        cmd,
        cwd=ROOT,
        env=dict(os.environ, M3_PROGRESS="0", **env, **extra),
        capture_output=True,
        text=True,
        timeout=900,
    )


def live_rows(uri: str, table: str, key: str | None) -> list:
    t = Bank(uri, live=True).dataset(table).to_table()
    t = t.drop([c for c in t.column_names if c in ("vector", "score")])  # floats from another process
    return sorted(t.to_pylist(), key=lambda r: str(r[key]) if key else str(sorted(r.items())))


def settings(corpus, uri: str, model) -> list[str]:
    return tiny_settings(
        corpus, uri, f"encode.checkpoint={model}", "rebuild.keep_builds=1", "rebuild.compact_after=true"
    )


@pytest.fixture(scope="module")
def rebuilt(tmp_path_factory, ray_local, s3):
    """Two rebuilds (full, then incremental) of a local bank and of an s3 bank; returns (local uri,
    s3 uri, local summaries, s3 summaries, settings of s3)."""
    import torch

    from model import Memory3, save_model

    root = tmp_path_factory.mktemp("rebuild-s3")
    corpus, model = root / "c.jsonl.gz", root / "model"
    plain, uri = str(root / "plain"), f"{s3[0]}/rebuild-bank"
    torch.manual_seed(0)
    save_model(Memory3(load_config("configs/demo.yaml", settings(corpus, plain, model)).model), model)
    local, remote = [], []
    for generation in (0, 1):
        write_corpus(corpus, edited(RECORDS, generation))
        local.append(run_rebuild(load_config("configs/demo.yaml", settings(corpus, plain, model))))
        remote.append(run_rebuild(load_config("configs/demo.yaml", settings(corpus, uri, model))))
    return plain, uri, local, remote, settings(corpus, uri, model)


def test_rebuilds_on_s3_publish_the_same_builds_as_on_a_local_path(rebuilt):
    plain, uri, local, remote, _ = rebuilt
    for a, b in zip(local, remote):
        assert b["status"] == a["status"] == "published"
        assert {k: b[k] for k in ("added", "changed", "removed")} == {k: a[k] for k in ("added", "changed", "removed")}
    assert remote[1]["memories"]["added"] > 0 and remote[1]["memories"]["changed"] > 0  # incremental, not full
    assert remote[1]["memories"]["unchanged"] == local[1]["memories"]["unchanged"] > 0
    for table, key in TABLES.items():
        assert live_rows(uri, table, key) == live_rows(plain, table, key), table


def test_s3_rebuild_retains_compacts_and_releases_its_lock(rebuilt):
    plain, uri, local, remote, _ = rebuilt
    m_local, m_s3 = read_manifest(Bank(plain)), read_manifest(Bank(uri))
    assert [h["build"] for h in m_s3["history"]] == [h["build"] for h in m_local["history"]]
    assert m_s3["build"] == m_local["build"] >= 2
    assert (remote[1]["compaction"] is None) == (local[1]["compaction"] is None)
    for table in ("refs", "memories", "embeddings"):
        # keep_builds=1: what retention left on the bucket is what it left on the disk
        s3_versions = [v["version"] for v in Bank(uri).dataset(table).versions()]
        assert len(s3_versions) == len(Bank(plain).dataset(table).versions()), table
        assert m_s3["versions"][table] in s3_versions
        assert Bank(uri).tags(table)["live"] == m_s3["versions"][table]
    assert remote[1]["retention"] and any(r["versions_removed"] for r in remote[1]["retention"].values())
    assert read_versioned(f"{uri}/_rebuild.lock") is None  # released by a conditional delete


def test_s3_rebuild_while_another_holds_the_lock_fails_at_once(rebuilt, s3):
    _, uri, _, _, sets = rebuilt
    before = read_manifest(Bank(uri))
    with BankLock(Bank(uri)):
        proc = m3(["rebuild"], sets, s3[1])
    assert proc.returncode == 2 and "another rebuild of this bank is running" in proc.stderr, proc.stderr[-2000:]
    assert f"lock file {uri}/_rebuild.lock" in proc.stderr
    assert read_manifest(Bank(uri)) == before
