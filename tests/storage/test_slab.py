"""Payload slabs (storage/slab.py) and the MemoryStore that reads them: the slab's payloads are
Lance's for every codec, a slab that does not mirror its table is never served, a byte flipped
in a slab is never served (the store reads Lance; damaged in both: one error), retention and
compaction keep slabs to the versions that exist, and the RAM cache's bound in bytes holds.

The banks are small real Lance tables of real codec payloads (random memories through each
codec; vq with a quantizer trained here), written the way the encode stage writes `memories`."""

from __future__ import annotations

import json
import logging
import shutil

import numpy as np
import pyarrow as pa
import pytest
import torch

from model.codecs import VQCodec, make_codec
from storage.bank import Bank
from storage.live import publish
from storage.memory_store import MemoryStore
from storage.retention import apply_retention, compact_bank
from storage.schemas import MEMORIES
from storage.slab import SlabError, SlabReader, ensure_slab, paths, read_header, verify_payloads

SHAPE = (2, 2, 2, 4, 8)  # (mem layers, 2, kv heads, k, head_dim)
MODEL = "m" * 16
CODECS = ("raw-bf16", "raw-fp16", "raw-fp32", "int8", "vq")


@pytest.fixture(scope="module")
def vq_file(tmp_path_factory):
    rng = np.random.default_rng(0)
    vq = VQCodec.train(rng.standard_normal((2000, SHAPE[-1])).astype(np.float32), seed=0, niter=5)
    path = tmp_path_factory.mktemp("quantizer") / f"{vq.quantizer_hash}.faiss"
    vq.save(path)
    return str(path), vq.quantizer_hash


def codec_for(name, vq_file):
    return make_codec("vq", quantizer=vq_file[0], quantizer_hash=vq_file[1]) if name == "vq" else make_codec(name)


def rows(codec, n: int, seed: int = 0, prefix: str = "d") -> pa.Table:
    mems = torch.from_numpy(np.random.default_rng(seed).standard_normal((n, *SHAPE)).astype(np.float32))
    ids = [f"{prefix}{i:04d}-0" for i in range(n)]
    return pa.table(
        {
            "ref_id": ids,
            "content_hash": [f"h{seed}-{i}" for i in range(n)],
            "model_hash": [MODEL] * n,
            "codec": [codec.name] * n,
            "shape": [list(SHAPE)] * n,
            "n_tokens": [(i % SHAPE[3]) + 1 for i in range(n)],
            "positions": [[0] * 16] * n,
            "payload": codec.encode_batch(mems),
        },
        schema=MEMORIES,
    )


def write(bank: Bank, table: pa.Table, codec, vq_file) -> int:
    lineage = {
        "model_hash": MODEL,
        "codec": codec.name,
        "sparsity": {"top_k": SHAPE[3]},
        "quantizer_hash": vq_file[1] if codec.name == "vq" else None,
        "quantizer_path": vq_file[0] if codec.name == "vq" else None,
    }
    return bank.write("memories", MEMORIES, table.to_batches(max_chunksize=7), lineage)


@pytest.mark.parametrize("name", CODECS)
def test_slab_payloads_equal_lance_and_fetch_equals_the_lance_path(tmp_path, vq_file, name):
    bank, codec = Bank(str(tmp_path)), codec_for(name, vq_file)
    table = rows(codec, 40)
    version = write(bank, table, codec, vq_file)
    header = ensure_slab(bank, version)
    assert header["rows"] == 40 and header["payload_bytes"] == codec.nbytes(SHAPE) and header["version"] == version
    verify_payloads(bank, version)
    payload_file = paths(bank, version)[0]
    flat = np.fromfile(payload_file, np.uint8).reshape(40, -1)
    lance_payloads = bank.dataset("memories").to_table(columns=["payload"]).column("payload").to_pylist()
    assert [r.tobytes() for r in flat] == lance_payloads
    some = np.array([39, 3, 4, 5, 0, 17])  # runs of adjacent rows, out of order
    for mapped in (True, False):
        reader = SlabReader(payload_file, 40, codec.nbytes(SHAPE), mapped=mapped)
        assert np.array_equal(reader.read(some), flat[some]) and np.array_equal(reader.read_pread(some), flat[some])
        reader.close()

    slab = MemoryStore(bank, MODEL, slab="require")
    plain = MemoryStore(bank, MODEL, slab="off")
    assert slab.slab is not None and plain.slab is None
    ids = table.column("ref_id").to_pylist()
    order = [ids[i] for i in np.random.default_rng(1).permutation(40)]
    asked = order[:25] + order[:3]  # repeats inside one request
    (m1, k1), (m2, k2) = slab.fetch(asked), plain.fetch(asked)
    assert torch.equal(m1, m2) and torch.equal(k1, k2) and slab.slab_reads == 25 and plain.slab_reads == 0
    again = order[20:40]  # hits and misses mixed
    (m1, k1), (m2, k2) = slab.fetch(again), plain.fetch(again)
    assert torch.equal(m1, m2) and torch.equal(k1, k2) and (slab.hits, slab.misses) == (plain.hits, plain.misses)
    # what the codec decodes from Lance's own payload, in the codec's dtype (raw bf16 stays bf16)
    want = codec.decode_batch([lance_payloads[ids.index(r)] for r in again], SHAPE, dtype=m1.dtype)
    assert torch.equal(m1, want)
    assert m1.dtype == {"raw-bf16": torch.bfloat16, "raw-fp16": torch.float16}.get(name, torch.float32)
    assert k1.tolist() == [[j < ids.index(r) % SHAPE[3] + 1 for j in range(SHAPE[3])] for r in again]


@pytest.fixture
def slabbed(tmp_path, vq_file):
    """A bank with memories version 1 and its slab, and version 2 (same rows but one content
    hash changed) without one."""
    bank, codec = Bank(str(tmp_path)), make_codec("int8")
    table = rows(codec, 30)
    v1 = write(bank, table, codec, vq_file)
    ensure_slab(bank, v1)
    hashes = table.column("content_hash").to_pylist()
    hashes[7] = "changed"
    v2 = write(bank, table.set_column(1, "content_hash", pa.array(hashes)), codec, vq_file)
    return bank, v1, v2


def copy_slab(bank, src: int, dst: int, **header_changes) -> None:
    (p1, h1), (p2, h2) = paths(bank, src), paths(bank, dst)
    shutil.copyfile(p1, p2)
    header = {**json.loads(h1.read_text()), **header_changes}
    h2.write_text(json.dumps(header))


def refused(bank, version, match):
    """The slab of `version` is refused: require raises, auto serves Lance and says why."""
    with pytest.raises(SlabError, match=match):
        MemoryStore(bank, MODEL, version=version, slab="require")
    store = MemoryStore(bank, MODEL, version=version)
    assert store.slab is None and store.slab_refused
    ids = list(store.row_of)[:10]
    m, k = store.fetch(ids)
    want = MemoryStore(bank, MODEL, version=version, slab="off").fetch(ids)
    assert torch.equal(m, want[0]) and torch.equal(k, want[1]) and store.slab_reads == 0
    return store.slab_refused


def test_a_slab_of_another_version_is_refused(slabbed):
    bank, v1, v2 = slabbed
    copy_slab(bank, v1, v2)  # v1's slab under v2's name, header unchanged
    assert "its version is 1, the table's is 2" in refused(bank, v2, "version")


def test_a_slab_whose_rows_changed_is_refused(slabbed):
    bank, v1, v2 = slabbed
    copy_slab(bank, v1, v2, version=v2)  # v1's payloads, claiming to be v2's: one row's hash differs
    assert "digest over (ref_id, content_hash)" in refused(bank, v2, "digest")


def test_a_slab_with_another_row_count_is_refused(slabbed):
    bank, v1, _ = slabbed
    _, header_path = paths(bank, v1)
    header_path.write_text(json.dumps({**json.loads(header_path.read_text()), "rows": 29}))
    assert "its rows is 29, the table's is 30" in refused(bank, v1, "rows")


def test_a_truncated_slab_is_refused(slabbed):
    bank, v1, _ = slabbed
    payload_path, _ = paths(bank, v1)
    data = payload_path.read_bytes()
    payload_path.write_bytes(data[:-100])
    assert "truncated" in refused(bank, v1, "truncated")
    payload_path.write_bytes(data[:-100] + b"x" * 100)  # right size, other bytes: the last row's checksum sees it
    with pytest.raises(SlabError, match=r"1 row\(s\) differ from their checksums \(first: row 29\)"):
        verify_payloads(bank, v1)


def flip(path, offset: int) -> None:
    """Invert one byte of a file in place (the page cache, and so every map of it, sees it)."""
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)[0]
        f.seek(offset)
        f.write(bytes([byte ^ 0xFF]))


@pytest.mark.parametrize("name", ["raw-bf16", "int8"])
def test_a_flipped_byte_in_the_slab_is_never_served(tmp_path, vq_file, name, caplog):
    """One byte of row 7's payload flipped: the header and the sizes still match, so the store
    opens the slab, but the row fails its crc32 at the read: the fetch answers Lance's memory,
    logs one line, and the store reads Lance from then on. Never the flipped bytes."""
    bank, codec = Bank(str(tmp_path)), codec_for(name, vq_file)
    table = rows(codec, 30)
    version = write(bank, table, codec, vq_file)
    ensure_slab(bank, version)
    per, ids = codec.nbytes(SHAPE), table.column("ref_id").to_pylist()
    lance_store = MemoryStore(bank, MODEL, slab="off")
    before = MemoryStore(bank, MODEL)  # opened before the flip: its memory map sees the new byte
    flip(paths(bank, version)[0], 7 * per + per // 2)
    after = MemoryStore(bank, MODEL)
    assert before.slab is not None and after.slab is not None
    ask = [ids[3], ids[7], ids[12]]
    want = lance_store.fetch(ask)
    with caplog.at_level(logging.WARNING, logger="storage.memory_store"):
        for store in (before, after):
            m, k = store.fetch(ask)
            assert torch.equal(m, want[0]) and torch.equal(k, want[1])
            assert store.slab is None and "row 7" in store.slab_refused and "checksum" in store.slab_refused
            assert torch.equal(store.fetch(ids[20:23])[0], lance_store.fetch(ids[20:23])[0])
            assert store.slab_reads == 0
    logged = [r.getMessage() for r in caplog.records if r.name == "storage.memory_store"]
    assert len(logged) == 2 and all("row 7" in m and "\n" not in m for m in logged)
    with pytest.raises(SlabError, match="row 7 differs from its checksum"):
        MemoryStore(bank, MODEL, slab="require").fetch([ids[7]])
    fine = MemoryStore(bank, MODEL)  # rows other than 7 still come from the slab
    fine.fetch([ids[1], ids[8], ids[29]])
    assert fine.slab is not None and fine.slab_reads == 3
    with pytest.raises(SlabError, match=r"1 row\(s\) differ from their checksums \(first: row 7\)"):
        verify_payloads(bank, version)


def test_a_memory_damaged_in_the_slab_and_in_lance_is_one_error(tmp_path, vq_file):
    """The same row flipped in the slab and in Lance's data file (Lance stores the payload's
    bytes as they are, with no checksum of its own): one line, never a wrong memory."""
    from model.errors import M3Error

    bank, codec = Bank(str(tmp_path)), make_codec("raw-fp32")
    table = rows(codec, 20)
    version = write(bank, table, codec, vq_file)
    ensure_slab(bank, version)
    ids, payload = table.column("ref_id").to_pylist(), table.column("payload")[5].as_py()
    flip(paths(bank, version)[0], 5 * codec.nbytes(SHAPE) + 10)
    [data_file] = [p for p in (tmp_path / "memories.lance" / "data").iterdir() if payload in p.read_bytes()]
    flip(data_file, data_file.read_bytes().index(payload) + 10)
    store = MemoryStore(bank, MODEL)
    with pytest.raises(M3Error, match="damaged in both the payload slab and Lance") as e:
        store.fetch([ids[4], ids[5]])
    assert ids[5] in str(e.value) and "\n" not in str(e.value) and "m3 bank verify" in str(e.value)
    assert torch.equal(store.fetch([ids[4]])[0], MemoryStore(bank, MODEL, slab="off").fetch([ids[4]])[0])


def test_a_slab_without_checksums_is_read_through_lance_until_written_again(slabbed):
    """A slab written before per-row checksums (format 1, no .crc file) is refused like a stale
    one, and the next ensure_slab (m3 encode, m3 rebuild, m3 bank compact) writes it again."""
    from storage.slab import FORMAT, crc_path

    bank, v1, _ = slabbed
    _, header_path = paths(bank, v1)
    header = json.loads(header_path.read_text())
    old = {k: v for k, v in header.items() if k not in ("row_check", "row_crcs_digest")}
    header_path.write_text(json.dumps({**old, "format": 1}))
    crc_path(bank, v1).unlink()
    assert "format 1" in refused(bank, v1, "format 1")
    assert ensure_slab(bank, v1)["format"] == FORMAT == 2 and crc_path(bank, v1).exists()
    assert MemoryStore(bank, MODEL, version=v1, slab="require").slab is not None


def test_a_damaged_checksum_file_is_refused(slabbed):
    from storage.slab import crc_path

    bank, v1, _ = slabbed
    flip(crc_path(bank, v1), 9)
    assert "checksum file" in refused(bank, v1, "checksum file")


def test_a_table_of_mixed_payload_sizes_gets_no_slab(tmp_path, vq_file):
    bank, codec = Bank(str(tmp_path)), make_codec("raw-fp32")
    table = rows(codec, 5)
    payloads = table.column("payload").to_pylist()
    payloads[2] = payloads[2][:-4]
    v = write(bank, table.set_column(7, "payload", pa.array(payloads, pa.binary())), codec, vq_file)
    with pytest.raises(SlabError, match="reference 'd0002-0': 1020 bytes, expected 1024"):
        ensure_slab(bank, v)
    assert read_header(bank, v) is None


def test_retention_drops_the_slabs_of_dropped_versions_and_compaction_writes_one(tmp_path, vq_file):
    bank, codec = Bank(str(tmp_path)), make_codec("raw-bf16")
    versions = []
    for seed in range(3):
        versions.append(write(bank, rows(codec, 12, seed), codec, vq_file))
        ensure_slab(bank, versions[-1])
        manifest = publish(bank, {"memories": versions[-1]})
    out = apply_retention(bank, manifest, keep_builds=1)
    assert out["memories"]["slabs_removed"] == versions[:2]
    assert [read_header(bank, v) is not None for v in versions] == [False, False, True]
    assert sorted(p.name for p in bank.layout.slabs("memories").iterdir()) == [
        f"v{versions[2]}.crc",
        f"v{versions[2]}.json",
        f"v{versions[2]}.payload",
    ]

    tbl = bank.db.open_table("memories")
    tbl.add(rows(codec, 5, seed=9, prefix="e"))  # a second fragment
    publish(bank, {"memories": tbl.version})
    summary = compact_bank(bank, keep_builds=1)
    new = summary["compacted"]["memories"]["to"]
    store = MemoryStore(Bank(bank.uri, live=True), MODEL, slab="require")
    assert store.ds.version == new and len(store) == 17
    assert torch.equal(
        store.fetch(list(store.row_of))[0],
        MemoryStore(Bank(bank.uri, live=True), MODEL, slab="off").fetch(list(store.row_of))[0],
    )


def test_the_cache_bound_in_bytes_holds(tmp_path, vq_file):
    bank, codec = Bank(str(tmp_path)), make_codec("raw-fp32")
    write(bank, rows(codec, 20), codec, vq_file)
    probe = MemoryStore(bank, MODEL)
    entry = probe.entry_bytes()
    assert entry == 2 * 2 * 2 * 4 * 8 * 4 + 2  # the float32 memory and its int16 kept count
    store = MemoryStore(bank, MODEL, cache_bytes=3 * entry + entry // 2)
    ids = list(store.row_of)
    lance = MemoryStore(bank, MODEL, cache_size=0, slab="off")
    for ask in (ids[:10], ids[:2], ids[5:9] + ids[:2], [ids[0]] * 4, ids[10:20]):
        m, k = store.fetch(ask)
        want = lance.fetch(ask)
        assert torch.equal(m, want[0]) and torch.equal(k, want[1])
        assert len(store.cache) <= 3 and store.cache_nbytes() <= 3 * entry + entry // 2
    assert store.capacity == 3 and store.cache_nbytes() == 3 * entry
    assert list(store.cache) == ids[17:20]  # the last request's last three
    store.fetch([ids[17], ids[0]])  # 17 refreshed, 0 loaded: 18 is the oldest, and goes
    assert list(store.cache) == [ids[19], ids[17], ids[0]]
    hits = store.hits
    m, _ = store.fetch([ids[0], ids[19]])
    assert store.hits == hits + 2
    m.zero_()  # an answer is the caller's: the cache does not share it
    assert torch.equal(store.fetch([ids[0]])[0], lance.fetch([ids[0]])[0])
    tiny = MemoryStore(bank, MODEL, cache_bytes=entry - 1)  # room for none: every fetch still answered
    assert tiny.capacity == 0 and torch.equal(tiny.fetch(ids[:4])[0], lance.fetch(ids[:4])[0])
    assert tiny.cache_nbytes() == 0 and len(tiny.cache) == 0


def test_bank_stats_counts_the_slab_files_on_their_own_line(tmp_path, vq_file):
    from jobs.ops.bank_stats import bank_stats, render
    from storage.schemas import REFS
    from storage.slab import footprint
    from tests.storage.banks import refs

    bank, codec = Bank(str(tmp_path)), make_codec("raw-fp32")
    table = rows(codec, 12)
    bank.write(
        "refs",
        REFS,
        refs(dict(zip(table.column("ref_id").to_pylist(), table.column("content_hash").to_pylist()))).to_batches(),
        {},
    )
    lineage = {
        "model_hash": MODEL,
        "codec": codec.name,
        "quantizer_hash": None,
        "config": {"model": {"n_layers": 2, "n_heads": 2, "ref_max_tokens": 4, "head_dim": 8}},
    }
    v1 = bank.write("memories", MEMORIES, table.to_batches(), lineage)
    assert footprint(bank)["bytes"] == 0
    ensure_slab(bank, v1)
    v2 = bank.write("memories", MEMORIES, rows(codec, 5, seed=1).to_batches(), lineage)
    ensure_slab(bank, v2)
    slab_files = [p for p in (tmp_path / "_slabs").rglob("*") if p.is_file()]
    stats = bank_stats(Bank(str(tmp_path)))
    slabs = stats["slabs"]
    assert slabs["files"] == len(slab_files) == 6 and slabs["versions"] == [v1, v2]  # payload, crc, header
    assert slabs["bytes"] == sum(p.stat().st_size for p in slab_files) > (12 + 5) * codec.nbytes(SHAPE)
    # the tables' bytes are their own directories: the slabs are not in them
    assert stats["live_bytes"] + stats["dead_bytes"] == sum(
        p.stat().st_size for p in tmp_path.glob("*.lance/**/*") if p.is_file()
    )
    line = next(ln for ln in render(stats).splitlines() if ln.startswith("slabs"))
    assert f"versions v{v1}, v{v2}" in line and "6 files" in line and f"{slabs['bytes'] / 1000:,.1f} KB" in line


@pytest.mark.parametrize("name", ["raw-bf16", "vq"])
def test_a_read_announces_its_rows_and_returns_them_in_the_order_asked(tmp_path, vq_file, name):
    """SlabReader.read probes the page cache and announces the batch's runs (WILLNEED) before
    copying: the rows come back the same for batches of every shape (one row, runs, gaps under
    and over _GAP, repeats, more runs than probes, every row)."""
    from storage import slab as slab_mod

    bank, codec = Bank(str(tmp_path)), codec_for(name, vq_file)
    version = write(bank, rows(codec, 60), codec, vq_file)
    ensure_slab(bank, version)
    per = codec.nbytes(SHAPE)
    flat = np.fromfile(paths(bank, version)[0], np.uint8).reshape(60, per)
    reader = SlabReader(paths(bank, version)[0], 60, per)
    rng = np.random.default_rng(0)
    asks = [
        np.array([7]),
        np.array([59, 0, 1, 2, 3]),
        np.array([4, 4, 30, 4]),
        np.arange(60)[::-1],
        np.arange(0, 60, 3),
        *(rng.permutation(60)[:k] for k in (2, slab_mod._PROBES + 1, 40)),
    ]
    for ask in asks:
        assert np.array_equal(reader.read(ask), flat[ask])
    assert reader._cached(np.arange(0, 60, 7))  # just read: in the page cache
    reader.close()
