"""`m3 bank verify` (jobs/ops/verify.py) on a small real bank, and what the other commands say
about a damaged one: one line naming the table and file (rc 2), never a traceback and never
"nothing to do".

The bank is built once by `m3 rebuild` (36 FOLDOC entries, the tiny model, raw-fp32 memories
with their payload slab, embeddings); each test damages its own copy the way the issue's users
did: bytes flipped in a refs data file (Lance still decodes it, 4 references' token_ids change,
content_hash does not), a refs file truncated, a byte flipped in the slab or in Lance's payload.
"""

from __future__ import annotations

import gzip
import json
import shutil
from pathlib import Path

import lance
import pyarrow as pa
import pytest

from jobs.cli.main import main
from jobs.config import load_config
from storage.bank import Bank
from tests.conftest import foldoc_records, tiny_settings

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def built(tmp_path_factory, ray_local):
    from jobs.ops.rebuild import run_rebuild

    root = tmp_path_factory.mktemp("verify")
    corpus = root / "c.jsonl.gz"
    with gzip.open(corpus, "wt", encoding="utf-8") as f:
        for rec in foldoc_records(30, min_words=40):
            f.write(json.dumps(rec) + "\n")
    assert run_rebuild(load_config("configs/demo.yaml", tiny_settings(corpus, root / "bank")))["status"] == "published"
    return root


@pytest.fixture
def bank(built, tmp_path) -> Path:
    """A copy of the built bank, this test's to damage."""
    shutil.copytree(built / "bank", tmp_path / "bank")
    return tmp_path / "bank"


def cli(capsys, bank: Path, built: Path, *argv: str) -> tuple[int, str, str]:
    sets = [x for s in tiny_settings(built / "c.jsonl.gz", bank) for x in ("--set", s)]
    capsys.readouterr()
    rc = main([*argv, "-c", "configs/demo.yaml", *sets])
    out, err = capsys.readouterr()
    return rc, out, err


def data_file(bank: Path, table: str) -> Path:
    [frag] = lance.dataset(str(bank / f"{table}.lance")).get_fragments()
    return bank / f"{table}.lance" / "data" / frag.data_files()[0].path


def flip(path: Path, offset: int, n: int = 1) -> None:
    data = bytearray(path.read_bytes())
    for i in range(offset, offset + n):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def failed(out: dict) -> dict[str, str]:
    return {c["name"]: c["detail"] for c in out["checks"] if not c["ok"]}


def one_line_error(err: str, command: str) -> str:
    assert "Traceback" not in err and err.startswith(f"m3 {command}: error:"), err
    assert len(err.strip().splitlines()) == 1, err
    return err


def test_verify_passes_on_a_sound_bank_quick_and_full(bank, built, capsys):
    from jobs.ops.verify import verify_bank

    full, quick = verify_bank(Bank(str(bank))), verify_bank(Bank(str(bank)), quick=True)
    assert full["failed"] == quick["failed"] == 0, failed(full) or failed(quick)
    names = [c["name"] for c in full["checks"]]
    for table in ("documents", "refs", "memories", "embeddings", "train_sequences", "rejects"):
        assert any(n.startswith(f"files {table} v") for n in names)
        assert any(n.startswith(f"scan {table} v") for n in names)
    assert any(n.startswith("slab payload memories") for n in names) and "embeddings ⊆ refs" in names
    assert not any(n.startswith(("scan ", "slab payload")) for n in (c["name"] for c in quick["checks"]))
    detail = {c["name"].split(" v")[0]: c["detail"] for c in full["checks"]}
    assert "token_hash(token_ids)" in detail["scan refs"] and "crc32" in detail["scan memories"]
    assert "header matches the table" in detail["slab memories"]
    rc, out, err = cli(capsys, bank, built, "bank", "verify")
    assert rc == 0 and err == "" and "FAILED" not in out and f"{len(names)} of {len(names)} checks passed" in out
    rc, out, _ = cli(capsys, bank, built, "bank", "verify", "--quick", "--build", "live")
    assert rc == 0 and "(quick)" in out and "build 1" in out


def column_data(path: Path, column: str) -> tuple[int, int]:
    """(position, size) of the largest buffer of a column's pages in a Lance data file: where its
    values are. Bytes are flipped only there: a flip in a length field (the text column's
    full-zip layout) can make Lance allocate gigabytes before it fails."""
    from lance.file import LanceFileReader

    meta = LanceFileReader(str(path)).metadata()
    pages = meta.columns[meta.schema.names.index(column)].pages
    return max(((b.position, b.size) for p in pages for b in p.buffers), key=lambda b: b[1])


def test_flipped_bytes_in_refs_change_token_ids_silently_and_verify_names_refs(bank, built, capsys):
    """16 bytes flipped in the token_ids values of a refs data file: Lance reads the table without
    an error, some references' token_ids differ, their content_hash does not (the issue's case)."""
    from jobs.ops.verify import verify_bank

    path = data_file(bank, "refs")
    data, before = path.read_bytes(), lance.dataset(str(bank / "refs.lance")).to_table()
    at, size = column_data(path, "token_ids")
    for offset in (at + size // 2, at + size // 3, at + 2 * size // 3):
        flip(path, offset, 16)
        try:
            after = lance.dataset(str(bank / "refs.lance")).to_table()
            changed = [c for c in before.column_names if not after.column(c).equals(before.column(c))]
        except Exception:  # noqa: BLE001 (a flip that does not decode: the next offset)
            changed = None
        if changed == ["token_ids"]:
            break
        path.write_bytes(data)
    else:
        pytest.fail("no 16-byte flip of the token_ids values changed token_ids alone")
    bad = failed(verify_bank(Bank(str(bank))))
    [name] = [n for n in bad if n.startswith("scan refs")]
    assert "content_hash or n_tokens does not match its token_ids" in bad[name]
    rc, out, err = cli(capsys, bank, built, "bank", "verify")
    assert rc == 2 and "FAILED" in out
    assert "scan refs" in one_line_error(err, "bank") and "FAILED" in err


def test_a_refs_file_that_does_not_decode_is_named(bank, built, capsys):
    """16 bytes flipped in the ref_id strings: not UTF-8 any more, Lance refuses the page."""
    from jobs.ops.verify import verify_bank

    path = data_file(bank, "refs")
    at, size = column_data(path, "ref_id")
    flip(path, at + size // 2, 16)
    with pytest.raises(Exception, match="(?i)corrupt|utf-8"):
        lance.dataset(str(bank / "refs.lance")).to_table(columns=["ref_id"])
    bad = failed(verify_bank(Bank(str(bank))))
    assert any(n.startswith("scan refs") and path.name in d for n, d in bad.items()), bad
    rc, _, err = cli(capsys, bank, built, "bank", "stats")
    assert rc == 2 and "table refs" in one_line_error(err, "bank") and path.name in err and "m3 bank verify" in err


def test_a_truncated_refs_file_fails_verify_rebuild_stats_and_encode_in_one_line(bank, built, capsys):
    from jobs.ops.verify import verify_bank

    path = data_file(bank, "refs")
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    bad = failed(verify_bank(Bank(str(bank)), quick=True))
    assert any(n.startswith("files refs") and path.name in d and "truncated" in d for n, d in bad.items()), bad
    for argv, command in ((["rebuild"], "rebuild"), (["bank", "stats"], "bank"), (["encode"], "encode")):
        rc, out, err = cli(capsys, bank, built, *argv)
        assert rc == 2 and "is up to date; nothing to do" not in out, (argv, out)
        line = one_line_error(err, command)
        assert "refs" in line and path.name in line and "m3 bank verify" in line, line


def test_rebuild_runs_the_cheap_part_of_verify_before_nothing_to_do(bank, built, capsys):
    """The footer of a documents file damaged (same size: no stage opens it when nothing
    changed): without the check, rebuild said "up to date; nothing to do" with rc 0."""
    rc, out, _ = cli(capsys, bank, built, "rebuild")
    assert rc == 0 and "is up to date; nothing to do" in out
    path = data_file(bank, "documents")
    flip(path, path.stat().st_size - 12, 8)
    rc, out, err = cli(capsys, bank, built, "rebuild")
    assert rc == 2 and "is up to date; nothing to do" not in out
    line = one_line_error(err, "rebuild")
    assert "not up to date" in line and "documents" in line and path.name in line


def test_a_flipped_byte_in_the_slab_or_in_lance_payloads_fails_verify_naming_memories(bank, built):
    from jobs.ops.verify import verify_bank
    from storage.slab import paths, read_header

    version = lance.dataset(str(bank / "memories.lance")).version
    header = read_header(Bank(str(bank)), version)
    slab_file = paths(Bank(str(bank)), version)[0]
    flip(slab_file, 3 * header["payload_bytes"] + 100)
    bad = failed(verify_bank(Bank(str(bank))))
    assert list(bad) == [f"slab payload memories v{version}"] and "row 3" in bad[f"slab payload memories v{version}"]
    assert "memories" in bad[f"slab payload memories v{version}"]
    flip(slab_file, 3 * header["payload_bytes"] + 100)  # back; now the same row in Lance
    payload = lance.dataset(str(bank / "memories.lance")).take([3], columns=["payload"]).column(0)[0].as_py()
    path = data_file(bank, "memories")
    flip(path, path.read_bytes().index(payload) + 100)
    bad = failed(verify_bank(Bank(str(bank))))
    assert list(bad) == [f"scan memories v{version}"] and "row 3" in bad[f"scan memories v{version}"]


def test_embeddings_of_references_not_in_refs_fail_verify(bank, built):
    from jobs.ops.verify import verify_bank
    from storage.live import live_versions, publish

    b = Bank(str(bank))
    emb = b.dataset("embeddings").to_table()
    ids = emb.column("ref_id").to_pylist()
    ids[0] = "no-such-ref-0000"
    at = emb.column_names.index("ref_id")
    v = b.write(
        "embeddings",
        emb.schema,
        emb.set_column(at, emb.schema.field(at), pa.array(ids, pa.string())).to_batches(),
        b.metadata("embeddings"),
    )
    manifest = json.loads((bank / "_live.json").read_text())
    publish(
        b,
        {**live_versions(Bank(str(bank))), "embeddings": v},
        {k: manifest[k] for k in ("ingest_key", "encode_key") if k in manifest},
    )
    bad = failed(verify_bank(Bank(str(bank))))
    assert list(bad) == ["embeddings ⊆ refs"] and "'no-such-ref-0000'" in bad["embeddings ⊆ refs"]
