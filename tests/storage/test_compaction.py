"""`m3 bank compact`'s storage half: fragments merged, unheld versions deleted, readers unharmed."""

import lance

from storage.bank import Bank
from storage.builds import table_versions
from storage.live import live_versions, publish, read_manifest
from storage.retention import compact_bank
from storage.schemas import REFS
from tests.storage.banks import B1_MEM, B1_REFS, B2_MEM, B2_REFS, memories, publish_build, refs


def test_compact_deletes_unheld_versions_and_keeps_builds_tags_and_newer_writes(tmp_path):
    bank = Bank(str(tmp_path))
    for key in ("one", "two", "three", "four"):
        publish_build(bank, B1_REFS if key in ("one", "three") else B2_REFS, B1_MEM, key)
    history = read_manifest(bank)["history"]
    bank.tag("refs", "monday", history[0]["versions"]["refs"])  # a user's tag on build 1
    newer = bank.write("refs", REFS, refs(B1_REFS).to_batches(), {})  # a rebuild in progress
    summary = compact_bank(bank, keep_builds=2)
    assert summary["compacted"] == {} and summary["skipped_newer_write"] == ["refs"]
    kept_refs = {history[0]["versions"]["refs"], history[2]["versions"]["refs"], history[3]["versions"]["refs"], newer}
    assert set(table_versions(bank, "refs")) == kept_refs  # build 2's version went; the tag held build 1's
    assert set(table_versions(bank, "memories")) == {h["versions"]["memories"] for h in history[2:]}
    assert summary["retention"]["refs"]["versions_removed"] == 1 and summary["retention"]["refs"]["bytes_removed"] > 0
    assert lance.dataset(str(tmp_path / "refs.lance"), version="monday").count_rows() == len(B1_REFS)
    assert compact_bank(bank, keep_builds=2)["retention"] == {}  # nothing left to delete


def test_compaction_merges_fragments_and_a_live_reader_keeps_reading(tmp_path):
    bank = Bank(str(tmp_path))
    publish_build(bank, B1_REFS, B1_MEM, "one")
    publish_build(bank, B2_REFS, {r: B2_MEM[r] for r in list(B2_MEM)[:3]}, "two")
    tbl = bank.db.open_table("memories")
    tbl.add(memories({r: B2_MEM[r] for r in list(B2_MEM)[3:]}))  # written in pieces: a second fragment
    manifest = publish(bank, {**live_versions(bank), "memories": tbl.version})
    reader = Bank(bank.uri, live=True)  # opened on build 3 before the compaction
    before = reader.dataset("memories").to_table().sort_by("ref_id")
    summary = compact_bank(bank, keep_builds=1)
    merged = summary["compacted"]["memories"]
    assert list(summary["compacted"]) == ["memories"] and merged["from"] == manifest["versions"]["memories"]
    assert summary["build"] == 4 and read_manifest(bank)["compacted_from"] == 3
    assert len(lance.dataset(str(tmp_path / "memories.lance")).get_fragments()) == 1
    assert reader.dataset("memories").to_table().sort_by("ref_id").equals(before)  # the old live build still reads
    assert Bank(bank.uri, live=True).dataset("memories").to_table().sort_by("ref_id").equals(before)
    assert set(table_versions(bank, "memories")) == {merged["from"], merged["to"]}
