"""Queries across builds: build numbers, pinning by build/tag/version, the builds view, diff."""

import json

import pytest

from storage.builds import BuildError, pinned_bank, reader_bank, resolve_build
from storage.diff import diff_builds, render
from storage.live import publish, read_manifest
from storage.sql import query
from tests.storage.banks import B1_REFS, B2_REFS, publish_build, two_builds


def ref_ids(bank) -> list[str]:
    return [r[0] for r in query(bank, "SELECT ref_id FROM refs ORDER BY 1")[1]]


def test_published_builds_are_numbered_and_keep_their_numbers(tmp_path):
    bank = two_builds(tmp_path)
    manifest = read_manifest(bank)
    assert manifest["build"] == 2 and [h["build"] for h in manifest["history"]] == [1, 2]
    assert manifest["history"][0]["ingest_key"] == "ingest-one"
    publish(bank, manifest["versions"])  # the live build again: same number, history does not grow
    assert read_manifest(bank)["build"] == 2 and len(read_manifest(bank)["history"]) == 2


def test_manifest_without_numbers_is_numbered_by_position(tmp_path):
    bank = two_builds(tmp_path)
    path = bank.layout.manifest()
    old = json.loads(path.read_text())
    old.pop("build")
    old["history"] = [{k: h[k] for k in ("versions", "published_at")} for h in old["history"]]
    path.write_text(json.dumps(old))
    assert resolve_build(bank, 1)["versions"] == old["history"][0]["versions"]
    publish_build(bank, {"d1-0": "a"}, {"d1-0": ("m1", b"x")}, "three")
    assert [h["build"] for h in read_manifest(bank)["history"]] == [1, 2, 3]  # written down, then 3


def test_pinned_queries_read_the_pinned_rows(tmp_path):
    bank = two_builds(tmp_path)
    b1 = resolve_build(bank, 1)["versions"]
    assert ref_ids(pinned_bank(bank)) == sorted(B2_REFS)  # default: live
    assert ref_ids(pinned_bank(bank, build=1)) == sorted(B1_REFS)
    assert ref_ids(pinned_bank(bank, build="-1")) == sorted(B1_REFS)
    assert ref_ids(pinned_bank(bank, build="live")) == sorted(B2_REFS)
    assert ref_ids(pinned_bank(bank, versions=[f"refs={b1['refs']}"])) == sorted(B1_REFS)
    bank.tag("refs", "monday", b1["refs"])
    tagged = pinned_bank(bank, tag="monday")
    assert ref_ids(tagged) == sorted(B1_REFS)  # refs has the tag
    assert query(tagged, "SELECT count(*) FROM memories")[1][0][0] == 6  # memories has not: live


def test_readers_share_one_resolution_live_by_default(tmp_path):
    """reader_bank: what `m3 sql`, `m3 generate` and `m3 eval` open: the live build's versions
    unless pinned, and --build resolved as pinned_bank resolves it."""
    bank = two_builds(tmp_path)
    live = reader_bank(bank)
    assert live.pins == read_manifest(bank)["versions"] and ref_ids(live) == sorted(B2_REFS)
    assert reader_bank(bank, "-1").pins == resolve_build(bank, 1)["versions"]
    assert ref_ids(reader_bank(bank, build="1")) == sorted(B1_REFS)
    with pytest.raises(BuildError, match=r"no published build 7"):
        reader_bank(bank, 7)


def test_bad_pins_name_what_exists(tmp_path):
    bank = two_builds(tmp_path)
    with pytest.raises(BuildError, match=r"no published build 7 .*builds: 1, 2; live is 2"):
        pinned_bank(bank, build=7)
    with pytest.raises(BuildError, match=r"only 1 build\(s\) before live"):
        pinned_bank(bank, build=-2)
    with pytest.raises(BuildError, match=r"no table .* has a tag 'friday' \(tags: live"):
        pinned_bank(bank, tag="friday")
    with pytest.raises(BuildError, match=r"table refs has no version 99 .*versions on disk: 1, 2"):
        pinned_bank(bank, versions=["refs=99"])
    with pytest.raises(BuildError, match=r"TABLE one of memories, refs"):
        pinned_bank(bank, versions=["nope=1"])


def test_builds_view(tmp_path):
    bank = two_builds(tmp_path)
    cols, rows = query(
        pinned_bank(bank),
        "SELECT build, live, versions, refs_rows, memories_rows, bytes, "
        "on_disk, ingest_key, encode_key, published_at FROM builds ORDER BY build",
    )
    got = [dict(zip(cols, r)) for r in rows]
    assert [(g["build"], g["live"], g["refs_rows"], g["memories_rows"]) for g in got] == [
        (1, False, 5, 5),
        (2, True, 6, 6),
    ]
    assert json.loads(got[0]["versions"]) == resolve_build(bank, 1)["versions"]
    assert got[1]["ingest_key"] == "ingest-two" and got[1]["encode_key"] == "encode-two"
    assert all(g["on_disk"] and g["bytes"] > 0 for g in got) and got[0]["published_at"].year >= 2024


def test_diff_counts_adds_removes_changes_and_reencodes(tmp_path):
    bank = two_builds(tmp_path)
    d = diff_builds(bank, 1, "live")
    r, m = d["refs"], d["memories"]
    assert (r["added"], r["removed"], r["changed"], r["unchanged"]) == (2, 1, 1, 3)
    assert r["examples"] == {"added": ["d6-0", "d7-0"], "removed": ["d3-0"], "changed": ["d2-0"]}
    assert (m["re_encoded"], m["new"], m["changed"], m["removed"], m["unchanged"]) == (4, 2, 2, 1, 2)
    assert m["examples"]["changed"] == ["d2-0", "d4-0"]
    assert "refs (v1 -> v2): added 2, removed 1, changed 1, unchanged 3" in render(d)
    same = diff_builds(bank, -1, 1)["refs"]
    assert same["unchanged"] == 5 and same["examples"] == {}
