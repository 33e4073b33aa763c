"""The one publish policy of `m3 rebuild` and `m3 run` (jobs/ops/publish.py): exactly the versions
given, compare-and-swap, the shrink guard, retention only after a publish. Hand-made banks, no Ray."""

from __future__ import annotations

import lance
import pytest

from jobs.config import ConfigError, load_config
from jobs.ops.publish import PublishRefused, publish_build, stage_versions
from storage.bank import Bank, BankError
from storage.live import PublishConflict, live_versions, manifest_state, read_manifest
from storage.schemas import MEMORIES, REFS
from tests.storage.banks import memories, refs


def write(bank: Bank, n: int, salt: str) -> dict[str, int]:
    rows = {f"d{i}-0": f"{salt}{i}" for i in range(n)}
    return {
        "refs": bank.write("refs", REFS, refs(rows).to_batches(), {"ingest_key": salt}),
        "memories": bank.write(
            "memories", MEMORIES, memories({r: ("m1", b"p") for r in rows}).to_batches(), {"ingest_key": salt}
        ),
    }


def cfg(path, *extra):
    return load_config(None, [f"bank.uri={path}", *extra])


def all_versions(path, table="refs") -> list[int]:
    return [v["version"] for v in lance.dataset(str(path / f"{table}.lance")).versions()]


def test_publishes_the_versions_given_then_retention(tmp_path):
    bank = Bank(str(tmp_path))
    one = write(bank, 10, "a")
    out = publish_build(bank, cfg(tmp_path), one, None)
    assert live_versions(bank) == one and out["references"] == 10 and out["live_references"] is None
    two = write(bank, 10, "b")
    write(bank, 10, "c")  # a later write: not published
    _, token = manifest_state(bank)
    publish_build(bank, cfg(tmp_path, "rebuild.keep_builds=1"), two, token)
    assert live_versions(bank) == two
    assert one["refs"] not in all_versions(tmp_path) and two["refs"] + 1 in all_versions(tmp_path)


def test_a_build_published_since_the_token_was_read_wins(tmp_path):
    bank = Bank(str(tmp_path))
    publish_build(bank, cfg(tmp_path), write(bank, 10, "a"), None)
    _, token = manifest_state(bank)
    other = write(bank, 10, "b")
    publish_build(bank, cfg(tmp_path), other, token)
    with pytest.raises(PublishConflict):
        publish_build(bank, cfg(tmp_path), write(bank, 10, "c"), token)
    assert live_versions(bank) == other


@pytest.mark.parametrize("n_new, refused", [(5, False), (4, True), (0, True)])
def test_shrink_guard(tmp_path, n_new, refused):
    bank = Bank(str(tmp_path))
    live = write(bank, 10, "a")
    publish_build(bank, cfg(tmp_path), live, None)
    new = write(bank, n_new, "b")
    _, token = manifest_state(bank)
    kept = all_versions(tmp_path)
    c = cfg(tmp_path, "rebuild.keep_builds=1", "rebuild.max_shrink=0.5")
    if not refused:
        publish_build(bank, c, new, token)
        assert live_versions(bank) == new
        return
    with pytest.raises(
        PublishRefused,
        match=r"the live build \(build 1\) has 10 references"
        if n_new == 0
        else rf"the live build has 10 references, this one would have {n_new} \(below 50% of them, "
        rf"rebuild.max_shrink=0.5\); nothing was published and the live build is intact. .*--allow-shrink",
    ):
        publish_build(bank, c, new, token)
    assert live_versions(bank) == live and all_versions(tmp_path) == kept  # no retention either
    if n_new == 0:  # never, even when told
        with pytest.raises(PublishRefused, match="0 references"):
            publish_build(bank, c, new, token, allow_shrink=True)
    else:
        publish_build(bank, c, new, token, allow_shrink=True)
        assert live_versions(bank) == new


def test_no_live_build_yet_still_refuses_zero_references(tmp_path):
    bank = Bank(str(tmp_path))
    with pytest.raises(PublishRefused, match=r"0 references \(there is no live build yet\)"):
        publish_build(bank, cfg(tmp_path), write(bank, 0, "a"), None, allow_shrink=True)
    assert read_manifest(bank) is None


def test_tables_built_from_another_refs_version_are_refused(tmp_path):
    bank = Bank(str(tmp_path))
    versions = write(bank, 10, "a")
    with pytest.raises(
        PublishRefused,
        match=rf"refs changed during this rebuild: it publishes refs version "
        rf"{versions['refs']}, but memories were built from refs version 9",
    ):
        publish_build(
            bank, cfg(tmp_path), versions, None, built_from={"memories": 9, "embeddings": None}, what="rebuild"
        )
    assert read_manifest(bank) is None


def test_both_commands_gather_the_versions_their_stages_built_over_those_found():
    tables = {"documents": 1, "rejects": 1, "refs": 2, "train_sequences": 1}
    results = {"ingest": {"versions": tables}, "encode": {"version": 7}, "embed": None}
    # m3 run --only ingest,encode: embeddings as found when the run started
    assert stage_versions(results, {"refs": 1, "embeddings": 3}) == {**tables, "memories": 7, "embeddings": 3}
    # m3 rebuild with rebuild.embeddings false publishes no embeddings table
    assert stage_versions(results, embeddings=False) == {**tables, "memories": 7}
    assert stage_versions({"encode": {"version": 7}})["refs"] is None  # refused by publish_build


def test_no_version_of_a_table_or_a_mixed_build_is_refused(tmp_path):
    bank = Bank(str(tmp_path))
    versions = write(bank, 10, "a")
    with pytest.raises(BankError, match="no embeddings table: run `m3 embed` first"):
        publish_build(bank, cfg(tmp_path), {**versions, "embeddings": None}, None)
    versions["memories"] = bank.write(
        "memories", MEMORIES, memories({"d0-0": ("m1", b"p")}).to_batches(), {"ingest_key": "b"}
    )
    with pytest.raises(BankError, match="not publishing a mixed build"):
        publish_build(bank, cfg(tmp_path), versions, None)
    assert read_manifest(bank) is None


@pytest.mark.parametrize("value", ["1.5", "-0.1", "much"])
def test_max_shrink_is_checked_at_load(value):
    with pytest.raises(ConfigError, match=r"rebuild.max_shrink"):
        load_config(None, [f"rebuild.max_shrink={value}"])
