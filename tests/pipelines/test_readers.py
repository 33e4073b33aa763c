"""Readers turn every kind of bad record into a reason, and config problems into clear errors."""

import gzip
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

from pipelines.readers import InputError, check_parquet_columns, count_records, expand_paths, plan_shards, read_shard
from tests.conftest import foldoc_records


def read_all(files, **kw):
    counts = [count_records(f, kw.get("max_record_bytes", 1 << 20))[0] for f in files]
    out = []
    for shard in plan_shards(files, counts, 3):
        out.extend(read_shard(shard, files, **kw))
    return counts, out


def test_jsonl_bad_records_each_get_a_reason(tmp_path):
    good = foldoc_records(2)
    lines = [
        json.dumps(good[0]).encode(),
        b"{not json",
        b'{"text": "caf\xe9"}',
        b'{"id": 7}',
        b'{"text": 42}',
        b"[1, 2]",
        b"",
        b"\x00\x01\x02\xff\xfe binary junk",
        json.dumps(good[1]).encode(),
        json.dumps({"text": "x" * 5000}).encode(),
    ]
    path = tmp_path / "c.jsonl"
    path.write_bytes(b"\n".join(lines))  # no final newline: the last record still counts
    files = expand_paths([str(path)])
    counts, recs = read_all(files, max_record_bytes=2048)
    assert counts == [len(lines)] and len(recs) == len(lines)
    reasons = [r.reason for r in recs]
    assert reasons == [
        None,
        "malformed_json",
        "invalid_utf8",
        "missing_text",
        "text_not_string",
        "not_an_object",
        "blank_line",
        "invalid_utf8",
        None,
        "record_too_large",
    ]
    assert recs[0].source_id == good[0]["id"] and json.loads(recs[0].meta) == {"title": good[0]["title"]}
    assert recs[1].raw_prefix == "{not json"
    assert len({r.rank for r in recs}) == len(recs)  # ranks are unique: dedup's tie-breaker
    assert recs[0].doc_id != recs[8].doc_id


@pytest.mark.parametrize("suffix", [".jsonl.gz", ".jsonl.zst"])
def test_compressed_jsonl(tmp_path, suffix):
    recs = foldoc_records(7)
    raw = "".join(json.dumps(r) + "\n" for r in recs).encode()
    path = tmp_path / f"c{suffix}"
    path.write_bytes(gzip.compress(raw) if suffix.endswith("gz") else zstandard.ZstdCompressor().compress(raw))
    counts, out = read_all(expand_paths([str(path)]))
    assert counts == [7] and [r.text for r in out] == [r["text"] for r in recs]


def test_parquet_and_text_folder(tmp_path):
    recs = foldoc_records(5)
    pq.write_table(
        pa.table({"text": [r["text"] for r in recs[:4]] + [None], "id": ["a", "b", "c", "d", "e"]}),
        tmp_path / "p.parquet",
    )
    folder = tmp_path / "txt"
    folder.mkdir()
    (folder / "one.txt").write_text(recs[0]["text"])
    (folder / "bin.txt").write_bytes(b"\x7fELF\x00\x00\x00binary")
    (folder / "latin1.md").write_bytes("na\xefve".encode("latin-1"))
    (folder / "LICENSE").write_text("not a corpus file: no known suffix")
    files = expand_paths([str(tmp_path / "p.parquet"), str(folder)])
    assert [f.format for f in files] == ["parquet", "text", "text", "text"]
    counts, out = read_all(files)
    assert counts == [5, 1, 1, 1]
    assert [r.reason for r in out[:5]] == [None] * 4 + ["missing_text"]
    assert [r.source_id for r in out[:4]] == ["a", "b", "c", "d"]
    by_name = {r.source.rsplit("/", 1)[-1]: r for r in out[5:]}
    assert by_name["one.txt"].text == recs[0]["text"]
    assert by_name["bin.txt"].reason == "binary_file"
    assert by_name["latin1.md"].reason == "invalid_utf8"


def test_missing_inputs_fail_before_any_work(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        expand_paths([str(tmp_path / "nope.jsonl")])
    with pytest.raises(InputError, match="matches no file"):
        expand_paths([str(tmp_path / "*.jsonl")])
    (tmp_path / "README").write_text("x")
    with pytest.raises(InputError, match="no readable corpus files"):
        expand_paths([str(tmp_path)])


def test_parquet_without_text_column_is_a_config_error(tmp_path):
    pq.write_table(pa.table({"body": ["x"]}), tmp_path / "p.parquet")
    with pytest.raises(InputError, match="no column 'text'.*columns are \\['body'\\]"):
        check_parquet_columns(expand_paths([str(tmp_path / "p.parquet")]), "text")


def test_shards_cover_every_record_once(tmp_path):
    recs = foldoc_records(23)
    path = tmp_path / "c.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    files = expand_paths([str(path)])
    shards = plan_shards(files, [23], 5)
    assert len(shards) == 5
    ids = [r.source_id for s in shards for r in read_shard(s, files)]
    assert ids == [r["id"] for r in recs]


def test_huge_line_is_skipped_without_reading_it_whole(tmp_path):
    path = tmp_path / "big.jsonl"
    with open(path, "wb") as f:
        f.write(json.dumps({"text": "ok " * 60}).encode() + b"\n")
        f.write(b'{"text": "' + b"a" * (3 << 20) + b'"}\n')
        f.write(json.dumps({"text": "after " * 60}).encode() + b"\n")
    counts, out = read_all(expand_paths([str(path)]), max_record_bytes=1 << 20)
    assert counts == [3]
    assert [r.reason for r in out] == [None, "record_too_large", None]
    assert out[2].text.startswith("after")


# A compressed file cut short (an interrupted download or copy) or with bytes flipped (a bad
# disk or transfer) must fail loudly, naming the file: read quietly, it becomes a corpus with
# records missing, or garbled, and an ingest that reports its accounting as OK.


def _corpus_bytes(n: int = 400) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in foldoc_records(n)).encode()


def _compress(raw: bytes, suffix: str) -> bytes:
    if suffix == ".gz":
        return gzip.compress(raw)
    # what the zstd CLI writes (a content checksum), and what python-zstandard writes by default (none)
    return zstandard.ZstdCompressor(write_checksum=suffix == ".zst").compress(raw)


COMPRESSED = [".gz", ".zst", ".zst-nochecksum"]


def _write(tmp_path, suffix: str, data: bytes):
    path = tmp_path / f"c.jsonl{suffix.split('-')[0]}"
    path.write_bytes(data)
    return path


def _read_every_way(path):
    """Count the file (the plan) and read it, shard by shard (the workers): both must fail."""
    files = expand_paths([str(path)])
    with pytest.raises(InputError) as counted:
        count_records(files[0], 1 << 20)
    # the workers read the file again: its last shard reaches the end and must fail there too
    with pytest.raises(InputError) as read:
        list(read_shard(plan_shards(files, [10**6], 10**6)[0], files))
    return str(counted.value), str(read.value)


@pytest.mark.parametrize("suffix", COMPRESSED)
@pytest.mark.parametrize("cut", [0.5, 0.97, "last byte"])
def test_truncated_compressed_file_is_an_error_naming_it(tmp_path, suffix, cut):
    whole = _compress(_corpus_bytes(), suffix)
    keep = len(whole) - 1 if cut == "last byte" else int(len(whole) * cut)
    path = _write(tmp_path, suffix, whole[:keep])
    for message in _read_every_way(path):
        assert message.startswith(f"{path}: ") and "truncated or corrupt" in message
        assert "\n" not in message


@pytest.mark.parametrize("suffix", [".gz", ".zst", ".zst-nochecksum"])
def test_flipped_bytes_in_a_compressed_file_are_an_error_naming_it(tmp_path, suffix):
    whole = bytearray(_compress(_corpus_bytes(), suffix))
    mid = len(whole) // 2
    whole[mid : mid + 8] = bytes(b ^ 0xFF for b in whole[mid : mid + 8])
    path = _write(tmp_path, suffix, bytes(whole))
    for message in _read_every_way(path):
        assert message.startswith(f"{path}: ") and "truncated or corrupt" in message


def test_flipped_checksum_of_a_zstd_frame_is_an_error(tmp_path):
    whole = bytearray(_compress(_corpus_bytes(50), ".zst"))
    whole[-2] ^= 0x01  # the content checksum (the last 4 bytes) no longer matches the text
    path = _write(tmp_path, ".zst", bytes(whole))
    for message in _read_every_way(path):
        assert "truncated or corrupt" in message and "checksum" in message


@pytest.mark.parametrize("suffix", [".gz", ".zst"])
def test_zero_byte_compressed_file_is_truncated(tmp_path, suffix):
    # gzip and zstd write a header even for empty input: a file of 0 bytes is a copy cut short
    path = _write(tmp_path, suffix, b"")
    for message in _read_every_way(path):
        assert message.startswith(f"{path}: ") and "truncated or corrupt" in message and "0 bytes" in message


def test_garbage_after_a_zstd_frame_is_an_error(tmp_path):
    path = _write(tmp_path, ".zst", _compress(_corpus_bytes(50), ".zst") + b"not zstd at all")
    for message in _read_every_way(path):
        assert "truncated or corrupt" in message


def test_truncated_compressed_text_file_is_an_error(tmp_path):
    (tmp_path / "t").mkdir()
    path = tmp_path / "t" / "a.txt.gz"
    path.write_bytes(gzip.compress(("word " * 20000).encode())[:-100])
    files = expand_paths([str(path)])
    with pytest.raises(InputError, match=rf"^{path}: .*truncated or corrupt"):
        read_all(files)


def test_several_zstd_frames_are_read_whole(tmp_path):
    # pzstd and `cat a.zst b.zst` write several frames; every one of them is corpus
    recs = foldoc_records(30)
    frames = [
        zstandard.ZstdCompressor(write_checksum=True).compress("".join(json.dumps(r) + "\n" for r in part).encode())
        for part in (recs[:10], recs[10:25], recs[25:])
    ]
    skippable = (0x184D2A50).to_bytes(4, "little") + (3).to_bytes(4, "little") + b"abc"
    path = _write(tmp_path, ".zst", frames[0] + skippable + frames[1] + frames[2])
    counts, out = read_all(expand_paths([str(path)]))
    assert counts == [30] and [r.source_id for r in out] == [r["id"] for r in recs]


@pytest.mark.parametrize(
    "suffix,data",
    [(".jsonl", b""), (".jsonl.gz", gzip.compress(b"")), (".jsonl.zst", zstandard.ZstdCompressor().compress(b""))],
    ids=["jsonl", "gz", "zst"],
)
def test_a_file_without_records_is_a_counted_reject(tmp_path, suffix, data):
    good = tmp_path / "a.jsonl"
    good.write_text(json.dumps(foldoc_records(1)[0]) + "\n")
    empty = tmp_path / f"b{suffix}"
    empty.write_bytes(data)
    counts, out = read_all(expand_paths([str(good), str(empty)]))
    assert counts == [1, 1]  # read = kept + rejected holds: the empty file is one rejected record
    assert [r.reason for r in out] == [None, "empty_file"] and out[1].source == str(empty)


def test_an_empty_parquet_file_is_a_counted_reject(tmp_path):
    pq.write_table(pa.table({"text": pa.array([], pa.string())}), tmp_path / "p.parquet")
    counts, out = read_all(expand_paths([str(tmp_path / "p.parquet")]))
    assert counts == [1] and [r.reason for r in out] == ["empty_file"]
