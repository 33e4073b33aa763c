"""What the person running `m3` can fix is one line on stderr and exit status 2, naming the file
or the key (issue 27, "Nothing lost, nothing let in"): a corpus file cut short or corrupt, a
corpus without a single document, a bank location that cannot be one, a configured path that is
not there, a full disk. Each test runs the real command (`jobs.cli.main.main`)."""

from __future__ import annotations

import errno
import gzip
import json
import os

import numpy as np
import pytest
import zstandard

from jobs.cli.main import main
from storage.bank import Bank
from tests.conftest import foldoc_records, write_foldoc_corpus
from tests.disk import fill, tmpfs

DEMO = "configs/demo.yaml"
SMALL = ["tokenizer.vocab_size=600", "chunking.seq_len=256", "ray.num_cpus=2", "corpus.records_per_shard=20"]


def sets(*pairs: str) -> list[str]:
    return [arg for pair in pairs for arg in ("--set", pair)]


def one_line_error(capsys, command: str, *args: str) -> str:
    """Run `m3 <command> -c demo <args>`: it must exit 2 with one line on stderr; returns it."""
    rc = main([command, "-c", DEMO, *args])
    captured = capsys.readouterr()
    assert rc == 2, captured
    lines = captured.err.splitlines()
    assert len(lines) == 1 and "Traceback" not in captured.err, captured.err
    assert lines[0].startswith(f"m3 {command}: error: ")
    return lines[0]


def corpus_bytes(n: int = 300) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in foldoc_records(n)).encode()


def versions(uri) -> dict[str, int]:
    bank = Bank(str(uri))
    return {name: bank.table(name).version for name in bank.tables()}


# --- the corpus ---------------------------------------------------------------------------


def test_truncated_zstd_corpus_fails_before_any_work(tmp_path, capsys):
    whole = zstandard.ZstdCompressor(write_checksum=True).compress(corpus_bytes())
    path = tmp_path / "part-0.jsonl.zst"
    path.write_bytes(whole[: len(whole) // 2])  # a download cut off half way
    line = one_line_error(capsys, "ingest", *sets(f"corpus.paths=[{path}]", f"bank.uri={tmp_path / 'bank'}", *SMALL))
    assert f"{path}: this zstd file is truncated or corrupt" in line
    assert not (tmp_path / "bank").exists() or versions(tmp_path / "bank") == {}  # refused while planning


def test_corrupt_gzip_corpus_is_one_line(tmp_path, capsys):
    whole = bytearray(gzip.compress(corpus_bytes()))
    mid = len(whole) // 2
    whole[mid : mid + 16] = bytes(b ^ 0x5A for b in whole[mid : mid + 16])  # a bad sector
    path = tmp_path / "part-0.jsonl.gz"
    path.write_bytes(bytes(whole))
    line = one_line_error(capsys, "ingest", *sets(f"corpus.paths=[{path}]", f"bank.uri={tmp_path / 'bank'}", *SMALL))
    assert f"{path}: this gzip file is truncated or corrupt" in line


@pytest.mark.slow
def test_an_error_raised_in_a_ray_task_is_one_line(tmp_path, capsys, ray_local):
    # a text file is counted without being read, so its truncation is found by the clean task
    # that reads it, on a worker: the driver gets it wrapped in a RayTaskError
    folder = tmp_path / "texts"
    folder.mkdir()
    (folder / "a.txt").write_text(foldoc_records(1)[0]["text"])
    cut = folder / "b.txt.gz"
    cut.write_bytes(gzip.compress(" ".join(r["text"] for r in foldoc_records(50)).encode())[:-200])
    line = one_line_error(
        capsys,
        "ingest",
        *sets(f"corpus.paths=[{folder}]", f"bank.uri={tmp_path / 'bank'}", "corpus.format=text", *SMALL),
    )
    assert f"{cut}: this gzip file is truncated or corrupt" in line
    assert not (tmp_path / "bank").exists() or versions(tmp_path / "bank") == {}


@pytest.mark.slow
def test_a_corpus_without_documents_is_refused(tmp_path, capsys, ray_local):
    (tmp_path / "empty.jsonl").write_bytes(b"")
    (tmp_path / "bad.jsonl").write_bytes(b"{not json\n[1, 2]\n")
    bank = tmp_path / "bank"
    line = one_line_error(capsys, "ingest", *sets(f"corpus.paths=[{tmp_path}/*.jsonl]", f"bank.uri={bank}", *SMALL))
    assert "yielded 0 documents" in line and "nothing written" in line
    assert "empty_file" in line and "malformed_json" in line and str(tmp_path) in line
    assert not bank.exists() or versions(bank) == {}


# --- the bank's location -------------------------------------------------------------------


@pytest.mark.parametrize("command", ["validate", "ingest", "sql"])
def test_a_bank_uri_that_is_a_file(tmp_path, capsys, command):
    afile = tmp_path / "notes.txt"
    afile.write_text("not a bank")
    extra = ["SELECT 1"] if command == "sql" else []
    for uri in (afile, afile / "bank", f"file://{afile}"):
        line = one_line_error(capsys, command, *sets(f"bank.uri={uri}"), *extra)
        assert "bank.uri" in line and f"{afile} is a file" in line
    assert afile.read_text() == "not a bank"


def test_a_bank_uri_of_an_unknown_scheme(capsys):
    line = one_line_error(capsys, "validate", *sets("bank.uri=foo://x/bank"))
    assert "bank.uri" in line and "foo://" in line
    assert "a local path" in line and "file://" in line and "s3://" in line


# --- configured paths that `m3 validate` checks ----------------------------------------------


def test_validate_checks_the_tokenizer_and_checkpoint_paths(tmp_path, capsys):
    line = one_line_error(capsys, "validate", *sets(f"tokenizer.path={tmp_path / 'tok.json'}"))
    assert f"tokenizer.path: {tmp_path / 'tok.json'} does not exist" in line
    (tmp_path / "tok.json").write_text("{not a tokenizer")
    line = one_line_error(capsys, "validate", *sets(f"tokenizer.path={tmp_path / 'tok.json'}"))
    assert line.startswith("m3 validate: error: tokenizer.path: ") and "not a readable tokenizer.json" in line

    line = one_line_error(capsys, "validate", *sets(f"encode.checkpoint={tmp_path / 'model'}"))
    assert f"encode.checkpoint: {tmp_path / 'model'} does not exist" in line
    (tmp_path / "model").mkdir()
    line = one_line_error(capsys, "validate", *sets(f"encode.checkpoint={tmp_path / 'model'}"))
    assert f"encode.checkpoint: {tmp_path / 'model'} holds no model.safetensors" in line


def test_validate_accepts_the_paths_when_they_are_there(tmp_path, capsys):
    from pipelines.tokenizer import train_bpe

    tok = train_bpe([r["text"] for r in foldoc_records(200)], 300, 2)
    (tmp_path / "tok.json").write_text(tok.to_str())
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "model.safetensors").write_bytes(b"")
    assert (
        main(
            [
                "validate",
                "-c",
                DEMO,
                *sets(f"tokenizer.path={tmp_path / 'tok.json'}", f"encode.checkpoint={tmp_path / 'model'}"),
            ]
        )
        == 0
    )
    assert "# OK" in capsys.readouterr().out


# --- a full disk ---------------------------------------------------------------------------


@pytest.fixture
def small_disk(tmp_path):
    """A 6 MiB file system of its own (tests/disk.py)."""
    with tmpfs(tmp_path / "disk", 6) as mount:
        yield mount


@pytest.mark.slow
def test_a_built_bank_survives_an_empty_corpus_and_a_full_disk(tmp_path, capsys, small_disk, ray_local):
    bank = small_disk / "bank"
    first = write_foldoc_corpus(tmp_path / "first.jsonl.gz", 40, min_words=60)
    assert main(["ingest", "-c", DEMO, *sets(f"corpus.paths=[{first}]", f"bank.uri={bank}", *SMALL)]) == 0
    before = versions(bank)
    counted = Bank(str(bank)).dataset("documents").count_rows()
    capsys.readouterr()

    # a corpus without a single document: refused, the bank's tables as they were, nothing staged
    (tmp_path / "empty.jsonl").write_bytes(b"")
    line = one_line_error(
        capsys, "ingest", *sets(f"corpus.paths=[{tmp_path / 'empty.jsonl'}]", f"bank.uri={bank}", *SMALL)
    )
    assert "yielded 0 documents: its 1 record(s) were all rejected (empty_file 1); nothing written" in line
    assert versions(bank) == before and not any((bank / "_staging").glob("*"))

    # a larger corpus, with the disk all but full: its ingest runs out of space part way
    second = write_foldoc_corpus(tmp_path / "second.jsonl.gz", 120)
    filler = fill(small_disk, leave=64 << 10)
    line = one_line_error(capsys, "ingest", *sets(f"corpus.paths=[{second}]", f"bank.uri={bank}", *SMALL))
    assert "no space left on device" in line and str(small_disk) in line
    assert "intact" in line and "free space and rerun" in line
    assert versions(bank) == before  # nothing of the failed build was committed
    assert Bank(str(bank)).dataset("documents").count_rows() == counted

    # space freed, the same command finishes the build
    filler.unlink()
    assert main(["ingest", "-c", DEMO, *sets(f"corpus.paths=[{second}]", f"bank.uri={bank}", *SMALL)]) == 0
    assert all(versions(bank)[name] > version for name, version in before.items())


def test_a_full_disk_under_lance_is_one_line(tmp_path, capsys, small_disk, monkeypatch):
    # Lance passes the kernel's ENOSPC on as a RuntimeError ("LanceError(IO): No space left on
    # device (os error 28)"), without errno: a real table write on the full disk, through `m3`
    import pyarrow as pa

    import jobs.cli.main as cli

    def write_a_table(cfg, args):
        schema = pa.schema([("x", pa.float64())])
        noise = pa.array(np.random.default_rng(0).random(200_000))  # 1.6 MB that no encoding shrinks
        Bank(cfg.bank.uri).write("big", schema, [pa.record_batch([noise], schema=schema)], {})
        return 0

    monkeypatch.setitem(cli.COMMANDS, "validate", write_a_table)
    fill(small_disk, leave=16 << 10)
    line = one_line_error(capsys, "validate", *sets(f"bank.uri={small_disk / 'bank'}"))
    assert f"no space left on device writing the bank at {small_disk / 'bank'}" in line


def test_enospc_names_the_file_it_carries(capsys, monkeypatch):
    # the branch a tmpfs rarely takes (a write's OSError carries no file name): one whose error does
    import jobs.cli.main as cli

    def full(cfg, args):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "/data/bank/_staging/x.parquet")

    monkeypatch.setitem(cli.COMMANDS, "validate", full)
    line = one_line_error(capsys, "validate")
    assert "no space left on device writing /data/bank/_staging/x.parquet" in line


def test_other_os_errors_keep_their_traceback(monkeypatch):
    import jobs.cli.main as cli

    def denied(cfg, args):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), "/data/bank")

    monkeypatch.setitem(cli.COMMANDS, "validate", denied)
    with pytest.raises(PermissionError):
        main(["validate", "-c", DEMO])
