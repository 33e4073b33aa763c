"""The one publish policy of `m3 rebuild` and `m3 run` (jobs/ops/publish.py): exactly the versions
given, compare-and-swap, the shrink guard, retention only after a publish. Hand-made banks, no Ray."""

from __future__ import annotations

import lance
import pytest

from jobs.config import ConfigError, load_config
from jobs.ops.publish import PublishRefused, publish_build
from storage.bank import Bank
from storage.live import PublishConflict, live_versions, manifest_state, read_manifest
from storage.schemas import MEMORIES, REFS
from tests.storage.banks import memories, refs


def write(bank: Bank, n: int, salt: str) -> dict[str, int]:
    rows = {f"d{i}-0": f"{salt}{i}" for i in range(n)}
    return {"refs": bank.write("refs", REFS, refs(rows).to_batches(), {"ingest_key": salt}),
            "memories": bank.write("memories", MEMORIES, memories({r: ("m1", b"p") for r in rows}).to_batches(),
                                   {"ingest_key": salt})}


def cfg(path, *extra):
    return load_config(None, [f"bank.uri={path}", *extra])


def all_versions(path, table="refs") -> list[int]:
    return [v["version"] for v in lance.dataset(str(path / f"{table}.lance")).versions()]


def test_publishes_the_versions_given_then_retention(tmp_path):
    bank = Bank(str(tmp_path))
    one = write(bank, 10, "a")
    out = publish_build(cfg(tmp_path), one, None)
    assert live_versions(str(tmp_path)) == one and out["references"] == 10 and out["live_references"] is None
    two = write(bank, 10, "b")
    write(bank, 10, "c")  # a later write: not published
    _, token = manifest_state(str(tmp_path))
    publish_build(cfg(tmp_path, "rebuild.keep_builds=1"), two, token)
    assert live_versions(str(tmp_path)) == two
    assert one["refs"] not in all_versions(tmp_path) and two["refs"] + 1 in all_versions(tmp_path)


def test_a_build_published_since_the_token_was_read_wins(tmp_path):
    bank = Bank(str(tmp_path))
    publish_build(cfg(tmp_path), write(bank, 10, "a"), None)
    _, token = manifest_state(str(tmp_path))
    other = write(bank, 10, "b")
    publish_build(cfg(tmp_path), other, token)
    with pytest.raises(PublishConflict):
        publish_build(cfg(tmp_path), write(bank, 10, "c"), token)
    assert live_versions(str(tmp_path)) == other


@pytest.mark.parametrize("n_new, refused", [(5, False), (4, True), (0, True)])
def test_shrink_guard(tmp_path, n_new, refused):
    bank = Bank(str(tmp_path))
    live = write(bank, 10, "a")
    publish_build(cfg(tmp_path), live, None)
    new = write(bank, n_new, "b")
    _, token = manifest_state(str(tmp_path))
    kept = all_versions(tmp_path)
    c = cfg(tmp_path, "rebuild.keep_builds=1", "rebuild.max_shrink=0.5")
    if not refused:
        publish_build(c, new, token)
        assert live_versions(str(tmp_path)) == new
        return
    with pytest.raises(PublishRefused, match=rf"the live build \(build 1\) has 10 references" if n_new == 0 else
                       rf"the live build has 10 references, this one would have {n_new} \(below 50% of them, "
                       rf"rebuild.max_shrink=0.5\); nothing was published and the live build is intact. .*--allow-shrink"):
        publish_build(c, new, token)
    assert live_versions(str(tmp_path)) == live and all_versions(tmp_path) == kept  # no retention either
    if n_new == 0:  # never, even when told
        with pytest.raises(PublishRefused, match="0 references"):
            publish_build(c, new, token, allow_shrink=True)
    else:
        publish_build(c, new, token, allow_shrink=True)
        assert live_versions(str(tmp_path)) == new


def test_no_live_build_yet_still_refuses_zero_references(tmp_path):
    with pytest.raises(PublishRefused, match=r"0 references \(there is no live build yet\)"):
        publish_build(cfg(tmp_path), write(Bank(str(tmp_path)), 0, "a"), None, allow_shrink=True)
    assert read_manifest(str(tmp_path)) is None


def test_tables_built_from_another_refs_version_are_refused(tmp_path):
    bank = Bank(str(tmp_path))
    versions = write(bank, 10, "a")
    with pytest.raises(PublishRefused, match=rf"refs changed during this rebuild: it publishes refs version "
                                             rf"{versions['refs']}, but memories were built from refs version 9"):
        publish_build(cfg(tmp_path), versions, None, built_from={"memories": 9, "embeddings": None}, what="rebuild")
    assert read_manifest(str(tmp_path)) is None


@pytest.mark.parametrize("value", ["1.5", "-0.1", "much"])
def test_max_shrink_is_checked_at_load(value):
    with pytest.raises(ConfigError, match=r"rebuild.max_shrink"):
        load_config(None, [f"rebuild.max_shrink={value}"])
