"""The fault-injection matrix of issue 27 ("Nothing lost, nothing let in"): over one small real
bank, every fault family the issue names, each followed by the commands a user runs.

    corpus   a .gz or .zst corpus file truncated or with bytes flipped, deleted, emptied, or a
             valid stream without a record: `m3 rebuild` refuses;
    bank     a refs data file, a memories data file, the memories' payload slab or its checksum
             file truncated, flipped or deleted: fetch (MemoryStore), `m3 sql`, `m3 bank stats`,
             `m3 bank verify`, `m3 encode`, `m3 rebuild`; then the same damage and a rebuild of
             a changed corpus (what copies the damaged table's rows into a new build);
    disk     the bank on a file system of its own (tmpfs) that fills during a rebuild;
    kill     the rebuild killed (jobs/faults.py `maybe_crash`: `os._exit`, no cleanup, as
             `kill -9`) at each stage, then run again (marker `faults`: deselected by default);
    writer   an `m3 ingest` of another corpus (and `m3 encode`, a second `m3 rebuild`) started
             while a rebuild holds the bank's write lock.

The invariant, checked after every command: the right answer (the intact bank's: the same
count, the same ref_ids, byte-equal memories), or exit status 2 with exactly one line on stderr
and no traceback; and the live manifest (storage/live.py) is either the one before the fault or
a complete, consistent build (references > 0, one memory and one embedding per reference of the
same content hash). A damage to a table or the slab of the live build is found by `m3 bank
verify`. Each outcome is one row of the table printed at the end of the run ("fault matrix").

The bank: one `m3 rebuild` of 30 FOLDOC entries (the tiny model, raw-fp32 memories with their
payload slab, embeddings), built once per module; each case damages its own copy. Runtime on
this 2-core machine (shared): ~100 s for the default selection, ~160 s more for the kill family
(`pytest -m faults`; each kill starts `python -m jobs rebuild`, and with it a Ray, of its own).
"""

from __future__ import annotations

import gzip
import json
import os
import re
import shutil
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import lance
import pytest
import zstandard

from jobs.cli.main import main
from model.errors import M3Error
from storage.bank import Bank
from storage.live import read_manifest
from storage.memory_store import MemoryStore
from tests.conftest import ROOT, foldoc_records, tiny_settings
from tests.disk import fill, tmpfs

pytestmark = [pytest.mark.slow, pytest.mark.long]  # ~100 s with its bank: CI runs it after the suite

DEMO = "configs/demo.yaml"
RECORDS = foldoc_records(36, min_words=40)


def generation(n: int) -> list[dict]:
    """The corpus of generation n: 30 entries, generation n with one changed, one removed and
    one added (the same corpus as tests/jobs/ops/test_rebuild.py)."""
    out = [dict(r) for r in RECORDS[:30]]
    out[n]["text"] += f" This entry was revised in generation {n} of the corpus."
    del out[10 + n]
    return out + [RECORDS[30 + n]]


def jsonl(records: list[dict]) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in records).encode()


def write_corpus(path: Path, records: list[dict]) -> Path:
    """A gzipped JSONL corpus. Always named c.jsonl.gz in its own directory: a document's id is
    of the file's name, so a changed corpus keeps the ids of the entries it did not change."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(jsonl(records)))
    return path


def argv_of(command: list[str], corpus: Path, bank: Path) -> list[str]:
    return [*command, "-c", DEMO, *[x for s in tiny_settings(corpus, bank) for x in ("--set", s)]]


# -- the matrix: one row per (case, command) ---------------------------------------------------

MATRIX: list[tuple[str, str, str]] = []
BAD = ("TRACEBACK", "NOT ONE LINE", "WRONG ANSWER", "MISSED", "BAD PUBLISH", "UNEXPECTED")


def record(case: str, command: str, outcome: str) -> str:
    MATRIX.append((case, command, re.sub(r"/tmp/pytest-of-[^/]+/pytest-\d+/[^/\s]+/", ".../", outcome)))
    return outcome


def fail(case: str, command: str, outcome: str, detail: str = "") -> None:
    record(case, command, outcome)
    pytest.fail(f"{case} / {command}: {outcome}{': ' + detail if detail else ''}", pytrace=False)


class _Summary:
    """Prints the matrix after the run (a plugin the module fixture registers)."""

    def pytest_terminal_summary(self, terminalreporter):
        if not MATRIX:
            return
        tr = terminalreporter
        tr.write_sep("=", "fault matrix (issue 27): case x command -> outcome")
        w1, w2 = (max(len(row[i]) for row in MATRIX) for i in (0, 1))
        for case, command, outcome in MATRIX:
            tr.write_line(f"{case:<{w1}}  {command:<{w2}}  {outcome[:150]}")
        n = {
            k: sum(o.startswith(k) for _, _, o in MATRIX)
            for k in ("right answer", "one line", "live unchanged", "published", *BAD)
        }
        tr.write_line(
            f"{len(MATRIX)} outcomes over {len({c for c, _, _ in MATRIX})} cases: right answer "
            f"{n['right answer']}, one line (rc 2) {n['one line']}, live unchanged {n['live unchanged']}, "
            f"consistent build published {n['published']}; silent wrong answers "
            f"{n['WRONG ANSWER'] + n['MISSED']}, empty or mixed publishes {n['BAD PUBLISH']}, tracebacks "
            f"{n['TRACEBACK']}, errors of more than one line {n['NOT ONE LINE']}, unexpected {n['UNEXPECTED']}"
        )


@dataclass
class Intact:
    """The bank as built, and the answers the intact bank gives."""

    root: Path
    bank: Path
    corpus: Path
    manifest: dict
    n_refs: int
    ref_ids: list[str]
    content: dict[str, str]  # ref_id -> content_hash
    memories: dict[str, bytes]  # ref_id -> the fetched memory's bytes


def fetch_all(bank: Path) -> dict[str, bytes]:
    """Every memory of the live build, fetched as a model would (slab when it passes, else Lance)."""
    b = Bank(str(bank), live=True)
    store = MemoryStore(b, b.metadata("memories")["model_hash"], cache_size=0)
    ids = sorted(store.row_of)
    mems, _ = store.fetch(ids)
    return {r: m.numpy().tobytes() for r, m in zip(ids, mems)}


@pytest.fixture(scope="module")
def built(tmp_path_factory, ray_local, request) -> Intact:
    from jobs.config import load_config
    from jobs.ops.rebuild import run_rebuild

    if not request.config.pluginmanager.has_plugin("fault-matrix"):
        request.config.pluginmanager.register(_Summary(), "fault-matrix")
    root = tmp_path_factory.mktemp("faults")
    corpus, bank = write_corpus(root / "corpus" / "c.jsonl.gz", generation(0)), root / "bank"
    assert run_rebuild(load_config(DEMO, tiny_settings(corpus, bank)))["status"] == "published"
    refs = Bank(str(bank), live=True).dataset("refs").to_table(columns=["ref_id", "content_hash"])
    ids = refs.column("ref_id").to_pylist()
    return Intact(
        root,
        bank,
        corpus,
        read_manifest(Bank(str(bank))),
        len(ids),
        sorted(ids),
        dict(zip(ids, refs.column("content_hash").to_pylist())),
        fetch_all(bank),
    )


@pytest.fixture
def bank(built, tmp_path) -> Path:
    """This case's copy of the built bank."""
    shutil.copytree(built.bank, tmp_path / "bank")
    return tmp_path / "bank"


# -- running a command and judging what it did --------------------------------------------------


def m3(capsys, command: list[str], corpus: Path, bank: Path) -> tuple[int | None, str, str]:
    """The real `m3` (jobs.cli.main.main): (rc, stdout, stderr); rc None with the traceback as
    stderr when it raised."""
    capsys.readouterr()
    try:
        rc = main(argv_of(command, corpus, bank))
    except BaseException:  # noqa: BLE001 - a traceback is the outcome under test
        out, _ = capsys.readouterr()
        return None, out, traceback.format_exc()
    out, err = capsys.readouterr()
    return rc, out, err


def judge(case: str, command: list[str], got: tuple, right=None, *, must_fail: bool = False) -> str:
    """The invariant for one command's outcome: rc 0 with the right answer (`right(stdout)`
    true), or rc 2 and exactly one stderr line `m3 <command>: error: ...` without a traceback.
    must_fail: the damage must be reported (`m3 bank verify` of a damaged bank)."""
    rc, out, err = got
    name = " ".join(command)
    if rc is None or "Traceback" in err:
        fail(case, name, "TRACEBACK", err[-3000:])
    if rc == 2:
        lines = err.splitlines()
        if len(lines) != 1 or not lines[0].startswith(f"m3 {command[0]}: error: "):
            fail(case, name, "NOT ONE LINE", err[-3000:])
        return record(case, name, f"one line: {lines[0].split(': error: ', 1)[1]}")
    if rc != 0:
        fail(case, name, "UNEXPECTED", f"rc {rc}: {err[-2000:]}")
    if must_fail:
        fail(case, name, "MISSED", f"rc 0 on a damaged bank: {out[-2000:]}")
    if right is not None and not right(out):
        fail(case, name, "WRONG ANSWER", out[-2000:])
    return record(case, name, "right answer")


def judge_fetch(case: str, bank: Path, intact: Intact) -> str:
    """A memory fetch through MemoryStore: every memory byte-equal to the intact bank's, or one
    M3Error of one line; never other bytes."""
    try:
        got = fetch_all(bank)
    except M3Error as e:
        if "\n" in str(e).strip():
            fail(case, "fetch (MemoryStore)", "NOT ONE LINE", str(e))
        return record(case, "fetch (MemoryStore)", f"one line: {e}")
    except Exception:  # noqa: BLE001
        fail(case, "fetch (MemoryStore)", "TRACEBACK", traceback.format_exc()[-3000:])
    wrong = [r for r in intact.memories if got.get(r) != intact.memories[r]]
    if set(got) != set(intact.memories) or wrong:
        fail(
            case,
            "fetch (MemoryStore)",
            "WRONG ANSWER",
            f"{len(wrong)} of {len(intact.memories)} memories differ from the intact bank's (first {wrong[:1]})",
        )
    return record(case, "fetch (MemoryStore)", "right answer")


def live_build(case: str, bank: Path, intact: Intact, before: dict, *, documents: int | None = None) -> str:
    """The live manifest is the one before, or a complete consistent build: references > 0,
    memories and embeddings of exactly its references (same content hashes), every memory of a
    reference the intact bank had with the same content byte-equal to the intact one."""
    manifest = read_manifest(Bank(str(bank)))
    if manifest == before:
        return record(case, "live manifest", "live unchanged")
    v = manifest["versions"]

    def pairs(table: str) -> set[tuple[str, str]]:
        t = lance.dataset(str(bank / f"{table}.lance"), version=v[table]).to_table(columns=["ref_id", "content_hash"])
        return set(zip(t.column("ref_id").to_pylist(), t.column("content_hash").to_pylist()))

    refs, mem, emb = pairs("refs"), pairs("memories"), pairs("embeddings")
    if not refs or mem != refs or emb != refs:
        fail(
            case,
            "live manifest",
            "BAD PUBLISH",
            f"build {manifest.get('build')}: {len(refs)} refs, "
            f"{len(mem)} memories ({len(mem - refs)} not of its refs), {len(emb)} embeddings ({len(emb - refs)} not)",
        )
    docs = lance.dataset(str(bank / "documents.lance"), version=v["documents"]).count_rows()
    if documents is not None and docs != documents:
        fail(
            case, "live manifest", "BAD PUBLISH", f"build {manifest.get('build')} has {docs} documents, not {documents}"
        )
    got = fetch_all(bank)
    kept = [r for r, h in refs if intact.content.get(r) == h]
    wrong = [r for r in kept if got[r] != intact.memories[r]]
    if wrong or len(kept) < len(refs) // 2:
        fail(
            case,
            "live manifest",
            "WRONG ANSWER",
            f"build {manifest.get('build')}: {len(wrong)} of the {len(kept)} "
            f"unchanged references' memories differ from the intact bank's (first {wrong[:1]})",
        )
    return record(
        case,
        "live manifest",
        f"published build {manifest.get('build')}: {len(refs)} refs, consistent, "
        f"{len(kept)} unchanged memories byte-equal",
    )


def readers_answer(capsys, case: str, bank: Path, intact: Intact, corpus: Path) -> None:
    """What a reader gets from the live build: the intact answers."""
    judge(
        case,
        ["sql", "SELECT count(*) AS n FROM refs"],
        m3(capsys, ["sql", "--format", "csv", "SELECT count(*) AS n FROM refs"], corpus, bank),
        lambda out: out.split() == ["n", str(intact.n_refs)],
    )
    judge_fetch(case, bank, intact)


# -- (1) the corpus --------------------------------------------------------------------------------


def _truncated(data: bytes) -> bytes:
    return data[: len(data) // 2]


def _flipped(data: bytes) -> bytes:
    out = bytearray(data)
    mid = len(out) // 2
    out[mid : mid + 16] = bytes(b ^ 0x5A for b in out[mid : mid + 16])  # a bad sector
    return bytes(out)


def _zst(data: bytes) -> bytes:
    return zstandard.ZstdCompressor(write_checksum=True).compress(data)


# (case, file name, bytes of the corpus file or None: no such file, what the one line must say)
CORPUS_FAULTS = [
    ("gz truncated", "c.jsonl.gz", lambda d: _truncated(gzip.compress(d)), "gzip file is truncated or corrupt"),
    ("gz flipped", "c.jsonl.gz", lambda d: _flipped(gzip.compress(d)), "gzip file is truncated or corrupt"),
    ("zst truncated", "c.jsonl.zst", lambda d: _truncated(_zst(d)), "zstd file is truncated or corrupt"),
    ("zst flipped", "c.jsonl.zst", lambda d: _flipped(_zst(d)), "zstd file is truncated or corrupt"),
    ("gz deleted", "c.jsonl.gz", None, "c.jsonl.gz"),
    ("gz emptied (0 bytes)", "c.jsonl.gz", lambda d: b"", "gzip file is truncated or corrupt"),
    ("gz without a record", "c.jsonl.gz", lambda d: gzip.compress(b""), "yielded 0 documents"),
]


@pytest.mark.parametrize("case,name,make,says", CORPUS_FAULTS, ids=[c[0] for c in CORPUS_FAULTS])
def test_corpus_fault(built, bank, tmp_path, capsys, case, name, make, says):
    """A corpus file damaged before a rebuild: one line naming it, nothing published; the live
    build still answers."""
    case = f"corpus: {case}"
    corpus = tmp_path / "corpus" / name
    corpus.parent.mkdir()
    if make is not None:
        corpus.write_bytes(make(jsonl(generation(1))))
    outcome = judge(case, ["rebuild"], m3(capsys, ["rebuild"], corpus, bank))
    if not outcome.startswith("one line") or says not in outcome:
        fail(case, "rebuild", "UNEXPECTED", f"expected one line saying {says!r}, got {outcome!r}")
    live_build(case, bank, built, built.manifest)
    if read_manifest(Bank(str(bank))) != built.manifest:
        fail(case, "live manifest", "BAD PUBLISH", "a refused rebuild changed the live build")
    readers_answer(capsys, case, bank, built, built.corpus)


# -- (2) the bank's files -----------------------------------------------------------------------


def live_file(bank: Path, table: str) -> Path:
    version = read_manifest(Bank(str(bank)))["versions"][table]
    [frag] = lance.dataset(str(bank / f"{table}.lance"), version=version).get_fragments()
    return bank / f"{table}.lance" / "data" / frag.data_files()[0].path


def slab_file(bank: Path, suffix: str) -> Path:
    return bank / "_slabs" / "memories" / f"v{read_manifest(Bank(str(bank)))['versions']['memories']}{suffix}"


def flip(path: Path, offset: int, n: int = 16) -> None:
    data = bytearray(path.read_bytes())
    data[offset : offset + n] = bytes(b ^ 0xFF for b in data[offset : offset + n])
    path.write_bytes(bytes(data))


def ref_id_bytes(path: Path) -> int:
    """An offset inside the ref_id strings of a refs data file (its largest buffer: the values):
    flipped there, the strings are no longer UTF-8 and Lance refuses the page. (A flip in a length
    field could make Lance allocate gigabytes before it fails.)"""
    from lance.file import LanceFileReader

    meta = LanceFileReader(str(path)).metadata()
    pages = meta.columns[meta.schema.names.index("ref_id")].pages
    at, size = max(((b.position, b.size) for p in pages for b in p.buffers), key=lambda b: b[1])
    return at + size // 2


def row3_payload(bank: Path) -> int:
    """An offset inside row 3's payload in the live memories data file."""
    version = read_manifest(Bank(str(bank)))["versions"]["memories"]
    payload = lance.dataset(str(bank / "memories.lance"), version=version).take([3], columns=["payload"])
    return live_file(bank, "memories").read_bytes().index(payload.column(0)[0].as_py()) + 100


def _payload_bytes(bank: Path) -> int:
    from storage.slab import read_header

    return read_header(Bank(str(bank)), read_manifest(Bank(str(bank)))["versions"]["memories"])["payload_bytes"]


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


# (case, damage(bank) -> the damaged file)
def _damage(target: str, how: str):
    def apply(bank: Path) -> Path:
        path = {
            "refs data file": lambda: live_file(bank, "refs"),
            "memories data file": lambda: live_file(bank, "memories"),
            "memories slab": lambda: slab_file(bank, ".payload"),
            "memories slab checksums": lambda: slab_file(bank, ".crc"),
        }[target]()
        if how == "truncated":
            truncate(path)
        elif how == "deleted":
            path.unlink()
        else:  # flipped: where it changes values, not a length a reader would trust
            offset = {
                "refs data file": lambda: ref_id_bytes(path),
                "memories data file": lambda: row3_payload(bank),
                "memories slab": lambda: 3 * _payload_bytes(bank) + 100,
                "memories slab checksums": lambda: 3 * 4,
            }[target]()
            flip(path, offset, 16 if target == "refs data file" else 4)
        return path

    return apply


BANK_FAULTS = [
    (f"{target} {how}", _damage(target, how))
    for target in ("refs data file", "memories data file", "memories slab")
    for how in ("truncated", "flipped", "deleted")
] + [("memories slab checksums flipped", _damage("memories slab checksums", "flipped"))]


@pytest.mark.parametrize("case,damage", BANK_FAULTS, ids=[c[0] for c in BANK_FAULTS])
def test_bank_file_fault(built, bank, capsys, case, damage):
    """A file of the live build damaged: every command answers right or says so in one line,
    never serving other bytes; `m3 bank verify` finds it; nothing is published over it."""
    case = f"bank: {case}"
    path = damage(bank)
    corpus, n = built.corpus, built.n_refs
    judge_fetch(case, bank, built)
    judge(
        case,
        ["sql", "SELECT count(*) AS n FROM refs"],
        m3(capsys, ["sql", "--format", "csv", "SELECT count(*) AS n FROM refs"], corpus, bank),
        lambda out: out.split() == ["n", str(n)],
    )
    judge(
        case,
        ["sql", "SELECT ref_id FROM refs"],
        m3(capsys, ["sql", "--format", "csv", "SELECT ref_id FROM refs ORDER BY ref_id"], corpus, bank),
        lambda out: out.split() == ["ref_id", *built.ref_ids],
    )
    judge(
        case,
        ["bank", "stats"],
        m3(capsys, ["bank", "stats", "--format", "json"], corpus, bank),
        lambda out: all(json.loads(out)["tables"][t]["rows"] == n for t in ("refs", "memories", "embeddings")),
    )
    outcome = judge(case, ["bank", "verify"], m3(capsys, ["bank", "verify"], corpus, bank), must_fail=True)
    if path.name not in outcome and "memories" not in outcome:
        fail(case, "bank verify", "UNEXPECTED", f"the one line names neither {path.name} nor memories: {outcome}")
    judge(case, ["encode"], m3(capsys, ["encode"], corpus, bank), lambda out: "nothing to do" in out)
    judge(case, ["rebuild"], m3(capsys, ["rebuild"], corpus, bank), lambda out: "nothing to do" in out)
    if read_manifest(Bank(str(bank))) != built.manifest:
        fail(case, "live manifest", "BAD PUBLISH", "a command published over a damaged live build")
    record(case, "live manifest", "live unchanged")


def _both_flipped(bank: Path) -> Path:
    """Row 3's payload flipped in the memories data file and in the slab: no intact copy left."""
    _damage("memories slab", "flipped")(bank)
    return _damage("memories data file", "flipped")(bank)


CHANGED_CORPUS_FAULTS = [
    c for c in BANK_FAULTS if c[0] in ("memories data file flipped", "memories slab flipped", "memories slab truncated")
] + [("memories data file and slab flipped", _both_flipped)]


@pytest.mark.parametrize("case,damage", CHANGED_CORPUS_FAULTS, ids=[c[0] for c in CHANGED_CORPUS_FAULTS])
def test_bank_file_fault_then_a_changed_corpus(built, bank, tmp_path, capsys, case, damage):
    """The same damage, then a rebuild of a changed corpus, which copies the unchanged
    references' memories into the new build: it refuses in one line, or publishes a build
    whose copied memories are the intact ones (a damaged payload must not become the new
    build's, with a slab and checksums written from it that say it is sound)."""
    case = f"bank: {case}, then a changed corpus"
    damage(bank)
    corpus = write_corpus(tmp_path / "corpus" / "c.jsonl.gz", generation(1))
    judge(case, ["rebuild"], m3(capsys, ["rebuild"], corpus, bank), lambda out: "published build" in out)
    live_build(case, bank, built, built.manifest, documents=30)
    if read_manifest(Bank(str(bank))) != built.manifest:
        judge(case, ["bank", "verify"], m3(capsys, ["bank", "verify"], corpus, bank), lambda out: "FAILED" not in out)


# -- (3) a full disk -------------------------------------------------------------------------------


@pytest.fixture
def small_disk(tmp_path):
    """A 16 MiB tmpfs of its own (tests/disk.py): the bank, ~4 MB, and one more build fit."""
    with tmpfs(tmp_path / "disk", 16) as mount:
        yield mount


@pytest.mark.parametrize("leave_kib", [64, 2048, 3600])
def test_full_disk_during_a_rebuild(built, small_disk, tmp_path, capsys, leave_kib):
    """The disk fills during a rebuild of a changed corpus (64 KiB left: in ingest; 2 MiB: in
    encode, writing memories; 3.5 MiB: in embed, after the memories and their slab): one line,
    the live build intact and answering; space freed, the same command publishes."""
    case = f"disk: full, {leave_kib} KiB left"
    bank = small_disk / "bank"
    shutil.copytree(built.bank, bank)
    corpus = write_corpus(tmp_path / "corpus" / "c.jsonl.gz", generation(1))
    filler = fill(small_disk, leave=leave_kib << 10)
    got = m3(capsys, ["rebuild"], corpus, bank)
    outcome = judge(case, ["rebuild"], got, lambda out: "published build" in out)
    if outcome.startswith("one line") and "no space left on device" not in outcome:
        fail(case, "rebuild", "UNEXPECTED", outcome)
    steps = [line for line in got[1].splitlines() if line.startswith(("[rebuild]", "[ingest]", "ingest"))]
    record(case, "rebuild: its last step", steps[-1] if steps else "(none)")
    if got[0] == 0:  # the disk held the whole build (the bank's size moved): right, but not this case
        if leave_kib == 64:
            fail(case, "rebuild", "UNEXPECTED", "published with 64 KiB free")
        live_build(case, bank, built, built.manifest, documents=30)
        return
    live_build(case, bank, built, built.manifest)
    readers_answer(
        capsys, case, bank, built, built.corpus if read_manifest(Bank(str(bank))) == built.manifest else corpus
    )
    filler.unlink()
    judge(
        case + ", space freed", ["rebuild"], m3(capsys, ["rebuild"], corpus, bank), lambda out: "published build" in out
    )
    if read_manifest(Bank(str(bank))) == built.manifest:
        fail(case, "rebuild after freeing space", "UNEXPECTED", "nothing was published")
    live_build(case + ", space freed", bank, built, built.manifest, documents=30)


# -- (4) kill -9 at each stage of a rebuild -------------------------------------------------------


def rebuild_process(corpus: Path, bank: Path, **env) -> subprocess.Popen:
    """`python -m jobs rebuild` in a process of its own (the crash hooks exit the process)."""
    return subprocess.Popen(
        [sys.executable, "-m", "jobs", *argv_of(["rebuild"], corpus, bank)],
        cwd=ROOT,
        env={**os.environ, "M3_PROGRESS": "0", **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


STAGES = ["clean", "dedup", "chunk", "commit", "encode", "embed", "publish"]


@pytest.mark.faults
@pytest.mark.parametrize("point", STAGES)
def test_rebuild_killed_at_each_stage(built, bank, tmp_path, capsys, point):
    """The rebuild of a changed corpus killed at `point` (jobs/faults.py, M3_CRASH_AT): the live
    build is the one before and answers; the rerun resumes and publishes a consistent build."""
    case = f"kill -9: at {point}"
    corpus = write_corpus(tmp_path / "corpus" / "c.jsonl.gz", generation(1))
    proc = rebuild_process(corpus, bank, M3_CRASH_AT=f"{point}:1")
    out, err = proc.communicate(timeout=300)
    if proc.returncode != 75:
        fail(case, "rebuild (killed)", "UNEXPECTED", f"rc {proc.returncode}, not killed at {point}: {err[-2000:]}")
    record(case, "rebuild (killed)", f"killed at {point}")
    live_build(case, bank, built, built.manifest)
    if read_manifest(Bank(str(bank))) != built.manifest:
        fail(case, "live manifest", "BAD PUBLISH", "a killed rebuild changed the live build")
    readers_answer(capsys, case, bank, built, built.corpus)
    judge(case + ", rerun", ["rebuild"], m3(capsys, ["rebuild"], corpus, bank), lambda out: "published build" in out)
    live_build(case + ", rerun", bank, built, built.manifest, documents=30)


# -- (5) a concurrent writer -----------------------------------------------------------------------


def test_a_writer_beside_a_running_rebuild(built, bank, tmp_path, capsys):
    """While a rebuild holds the bank's write lock (held in its clean stage, jobs/faults.py
    M3_PAUSE_AT), an `m3 ingest` of another corpus, an `m3 encode` and a second `m3 rebuild`
    each fail at once with one line naming it; the rebuild then publishes its own build, with
    nothing of the other corpus."""
    case = "writer: m3 ingest beside a rebuild"
    corpus = write_corpus(tmp_path / "corpus" / "c.jsonl.gz", generation(1))
    other = write_corpus(tmp_path / "other" / "other.jsonl.gz", foldoc_records(80, min_words=40)[40:])
    marks = tmp_path / "marks"
    marks.mkdir()
    proc = rebuild_process(corpus, bank, M3_PAUSE_AT=f"clean:0:{marks}")
    try:
        deadline = time.monotonic() + 240
        while not (marks / "clean.paused").exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                fail(case, "rebuild (paused)", "UNEXPECTED", f"the rebuild did not pause: rc {proc.poll()}")
            time.sleep(0.2)
        record(case, "rebuild (paused)", "holds the write lock, paused in clean")
        for command, data, says in (
            (["ingest"], other, "not starting ingest beside it"),
            (["encode"], corpus, "not starting encode beside it"),
            (["rebuild"], corpus, "not starting a second one"),
        ):
            outcome = judge(case, command, m3(capsys, command, data, bank))
            if f"another rebuild of this bank is running (pid {proc.pid}" not in outcome or says not in outcome:
                fail(case, command[0], "UNEXPECTED", f"not the lock's one line: {outcome}")
    finally:
        (marks / "go").touch()
        out, err = proc.communicate(timeout=300)
    if proc.returncode != 0 or "Traceback" in err:
        fail(case, "rebuild (resumed)", "UNEXPECTED", f"rc {proc.returncode}: {err[-3000:]}")
    record(case, "rebuild (resumed)", "right answer: " + out.strip().splitlines()[-1][:120])
    live_build(case, bank, built, built.manifest, documents=30)
    sources = Bank(str(bank), live=True).dataset("documents").to_table(columns=["source"]).column("source").to_pylist()
    if any("other.jsonl.gz" in s for s in sources):
        fail(case, "live manifest", "BAD PUBLISH", "documents of the other corpus are live")
