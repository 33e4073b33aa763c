"""The rebuild lock: one holder, a clear message for the loser, stale locks taken over."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
import time

import pytest

from jobs.cli.main import main
from jobs.config import load_config
from jobs.ops.lock import BankLock, LockError
from storage.bank import Bank
from tests.conftest import ROOT
from tests.storage.racing import race


def test_second_taker_fails_fast_naming_the_holder(tmp_path):
    with BankLock(Bank(str(tmp_path))):
        with pytest.raises(
            LockError,
            match=rf"another rebuild of this bank is running \(pid {__import__('os').getpid()} on "
            rf"{socket.gethostname()}, started .*lock file",
        ):
            BankLock(Bank(str(tmp_path))).acquire()
    BankLock(Bank(str(tmp_path))).acquire()  # released on exit: free again


def test_lock_of_a_dead_process_is_taken_over(tmp_path, capsys):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / "_rebuild.lock").write_text(
        json.dumps({"pid": dead.pid, "host": socket.gethostname(), "started_at": time.time() - 5})
    )
    lock = BankLock(Bank(str(tmp_path)))
    lock.acquire()
    assert json.loads((tmp_path / "_rebuild.lock").read_text())["pid"] == __import__("os").getpid()
    out = capsys.readouterr().out
    assert "removing stale lock" in out and f"process {dead.pid} no longer exists" in out
    lock.release()


def test_lock_whose_pid_was_reused_is_stale(tmp_path):
    # our own pid, but the lock claims to predate this process's start: a reused pid
    (tmp_path / "_rebuild.lock").write_text(
        json.dumps({"pid": __import__("os").getpid(), "host": socket.gethostname(), "started_at": 1000.0})
    )
    with BankLock(Bank(str(tmp_path))) as lock:
        assert lock.held


def test_other_hosts_lock_is_respected_until_old(tmp_path):
    info = {"pid": 1, "host": "some-other-host", "started_at": time.time() - 60}
    (tmp_path / "_rebuild.lock").write_text(json.dumps(info))
    with pytest.raises(LockError, match="some-other-host"):
        BankLock(Bank(str(tmp_path)), stale_after_s=3600).acquire()
    with BankLock(Bank(str(tmp_path)), stale_after_s=30) as lock:
        assert lock.held


def test_concurrent_takers_exactly_one_wins(tmp_path):
    outcomes = race("tests.storage.racing:take_lock", (str(tmp_path),), n=4)
    assert sorted(what for _, what, _ in outcomes) == ["lost", "lost", "lost", "won"], outcomes
    assert all("another rebuild of this bank is running" in r for _, what, r in outcomes if what == "lost"), outcomes


# -- one write lock for every command that writes a bank (issue 27) --------------------------


@pytest.fixture
def rebuild_elsewhere(tmp_path):
    """The bank's write lock held by another process, as a running `m3 rebuild` holds it."""
    bank = tmp_path / "bank"
    code = (
        "import sys; from jobs.ops.lock import BankLock; from storage.bank import Bank; "
        "lock = BankLock(Bank(sys.argv[1]), 'rebuild'); "
        "lock.acquire(); print('held', flush=True); sys.stdin.read(); lock.release()"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code, str(bank)], cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout.readline().strip() == "held"
        yield bank, proc.pid
    finally:
        proc.stdin.close()
        proc.wait(30)


def _writers():
    from jobs.ops.compact import run_compact
    from jobs.ops.rebuild import run_rebuild
    from jobs.ops.run import run_all
    from jobs.stages.embed import run_embed
    from jobs.stages.encode import run_encode
    from jobs.stages.ingest import run_ingest
    from jobs.stages.pair import run_pair
    from jobs.training.trainer import run_train

    return {
        "ingest": run_ingest,
        "encode": run_encode,
        "embed": run_embed,
        "pair": run_pair,
        "warmup": lambda cfg: run_train(cfg, "warmup"),
        "continual": lambda cfg: run_train(cfg, "continual"),
        "compact": run_compact,
        "rebuild": run_rebuild,
        "run": lambda cfg: run_all(cfg, only="ingest"),
    }


@pytest.mark.parametrize(
    "writer", ["ingest", "encode", "embed", "pair", "warmup", "continual", "compact", "rebuild", "run"]
)
def test_every_writer_refuses_while_a_rebuild_holds_the_bank(rebuild_elsewhere, monkeypatch, writer):
    bank, pid = rebuild_elsewhere
    import jobs.stages.ingest

    def no_work(*a, **k):
        raise AssertionError("started work without the bank's write lock")

    monkeypatch.setattr(jobs.stages.ingest, "plan", no_work)
    cfg = load_config(None, [f"bank.uri={bank}"])
    with pytest.raises(
        LockError,
        match=rf"another rebuild of this bank is running \(pid {pid} on "
        rf"{socket.gethostname()}, started .*lock file {bank}/_rebuild.lock\)",
    ) as e:
        _writers()[writer](cfg)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize(
    "command", ["ingest", "encode", "embed", "pair", "train --stage warmup", "run --only ingest", "bank compact"]
)
def test_the_cli_says_so_in_one_line(rebuild_elsewhere, capsys, monkeypatch, command):
    import jobs.stages.ingest

    bank, pid = rebuild_elsewhere
    monkeypatch.setattr(jobs.stages.ingest, "plan", lambda cfg: pytest.fail("started work without the lock"))
    assert main([*command.split(), "--set", f"bank.uri={bank}"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"another rebuild of this bank is running (pid {pid} on" in err, err


def test_the_lock_says_what_holds_it(tmp_path):
    with BankLock(Bank(str(tmp_path)), "ingest"):
        assert json.loads((tmp_path / "_rebuild.lock").read_text())["what"] == "ingest"  # one file for every writer
        with pytest.raises(LockError, match=r"another ingest of this bank is running .*: not starting rebuild"):
            BankLock(Bank(str(tmp_path)), "rebuild").acquire()


def test_writer_lock_is_reentrant_in_its_thread_only(tmp_path):
    """`m3 rebuild` and `m3 run` hold the lock while they call the stages that take it alone."""
    path = tmp_path / "_rebuild.lock"
    with BankLock(Bank(str(tmp_path)), "rebuild", reentrant=True):
        with BankLock(Bank(str(tmp_path)), "ingest", reentrant=True) as inner:
            assert inner.held and json.loads(path.read_text())["what"] == "rebuild"
        assert path.exists()  # the inner release leaves the outer hold alone
        errors = []

        def other_thread():
            try:
                BankLock(Bank(str(tmp_path)), "encode", reentrant=True).acquire()
            except LockError as e:
                errors.append(str(e))

        t = threading.Thread(target=other_thread)
        t.start()
        t.join()
        assert len(errors) == 1 and "another rebuild of this bank is running" in errors[0]
        with pytest.raises(LockError):  # a plain taker is not reentrant
            BankLock(Bank(str(tmp_path)), "rebuild").acquire()
    assert not path.exists()
    with BankLock(Bank(str(tmp_path)), "ingest", reentrant=True):
        assert json.loads(path.read_text())["what"] == "ingest"


@pytest.mark.slow
def test_two_concurrent_ingests_one_wins_the_other_says_so(tmp_path):
    """Two `m3 ingest` of one bank started together: one ingests, the other fails at once with
    one line naming it (before: both returned 0 and the last writer won)."""
    from tests.conftest import write_foldoc_corpus

    bank = tmp_path / "bank"
    procs = []
    for i in range(2):
        corpus = write_foldoc_corpus(tmp_path / f"c{i}.jsonl.gz", 30 + 10 * i, min_words=20)
        args = [sys.executable, "-m", "jobs", "ingest"]
        for o in (
            f"corpus.paths=[{corpus}]",
            f"bank.uri={bank}",
            "corpus.records_per_shard=100",
            "tokenizer.vocab_size=600",
            "chunking.seq_len=256",
            "ray.num_cpus=1",
        ):
            args += ["--set", o]
        procs.append(
            subprocess.Popen(
                args,
                cwd=ROOT,
                env={**__import__("os").environ, "M3_PROGRESS": "0"},
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    outs = [(p.wait(300), *p.communicate()) for p in procs]
    codes = sorted(rc for rc, _, _ in outs)
    assert codes == [0, 2], [(rc, err[-2000:]) for rc, _, err in outs]
    rc, _, err = next(o for o in outs if o[0] == 2)
    assert err.strip().splitlines()[-1].startswith("m3 ingest: error: another ingest of this bank is running (pid "), (
        err
    )
    assert err.count("error") == 1, err  # one line
    assert not (bank / "_rebuild.lock").exists()  # released by the winner
