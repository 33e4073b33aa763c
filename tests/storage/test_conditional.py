"""Compare-and-swap of control files (storage/conditional.py) and the live manifest's guarded
publish (storage/live.py), on a local directory and on the S3 server of the `s3` fixture
(conditional requests: If-None-Match / If-Match)."""

from __future__ import annotations

import json

import pytest

from storage.conditional import PreconditionFailed, read_versioned, remove_if, write_if
from storage.live import PublishConflict, manifest_state, publish, read_manifest
from tests.storage.banks import B1_MEM, B1_REFS, publish_build, two_builds
from tests.storage.racing import race, s3_serial  # noqa: F401 - fixture


def location(kind: str, request, tmp_path) -> str:
    if kind == "local":
        return str(tmp_path)
    return f"{request.getfixturevalue('s3_serial')[0]}/cas-{tmp_path.name}"


@pytest.fixture(params=["local", "s3"])
def where(request, tmp_path):
    """A fresh location on a local disk or on the bucket."""
    return location(request.param, request, tmp_path)


def test_write_if_and_remove_if_compare_versions(where):
    path = f"{where}/ctl.json"
    assert read_versioned(path) is None
    first = write_if(path, b"one", None)
    with pytest.raises(PreconditionFailed, match="exists"):
        write_if(path, b"two", None)  # create-only: it exists now
    assert read_versioned(path) == (b"one", first)
    second = write_if(path, b"two", first)
    with pytest.raises(PreconditionFailed, match="changed since it was read"):
        write_if(path, b"three", first)  # a writer that read "one" is too late
    assert read_versioned(path) == (b"two", second) and second != first
    assert not remove_if(path, first)  # not the version we read: left alone
    assert read_versioned(path)[0] == b"two"
    assert remove_if(path, second) and read_versioned(path) is None


# create-only is what the S3 lock does (a local lock is an O_EXCL file: tests/jobs/ops/test_lock.py);
# replace-if-unchanged is what every publish does
@pytest.mark.parametrize("kind,start", [("s3", "absent"), ("s3", "present"), ("local", "present")])
def test_of_concurrent_conditional_writers_exactly_one_wins(kind, start, request, tmp_path):
    path = f"{location(kind, request, tmp_path)}/race-{start}.json"
    expect = write_if(path, b"start", None) if start == "present" else None
    outcomes = race("tests.storage.racing:write_as", (path, expect))
    winners = [me for me, what, _ in outcomes if what == "won"]
    assert len(winners) == 1 and all("PreconditionFailed" in r for _, what, r in outcomes if what == "lost"), outcomes
    assert read_versioned(path)[0] == f"writer {winners[0]}".encode()


def test_publish_refuses_a_manifest_that_changed_since_it_was_read(where):
    bank = two_builds(f"{where}/bank")
    manifest, token = manifest_state(bank)  # what a rebuild reads before it builds
    assert manifest == read_manifest(bank) and manifest["build"] == 2
    publish_build(bank, B1_REFS, B1_MEM, "other")  # another publisher gets in between: build 3
    with pytest.raises(PublishConflict, match=r"changed since this build started \(it is now build 3"):
        publish(bank, manifest["versions"], {"by": "late"}, expect=token)
    assert read_manifest(bank)["build"] == 3 and "by" not in read_manifest(bank)
    _, token = manifest_state(bank)
    out = publish(bank, manifest["versions"], {"by": "on time"}, expect=token)  # read again: it may publish
    assert read_manifest(bank) == json.loads(json.dumps(out)) and out["build"] == 4
    assert Bank_tags(bank) == manifest["versions"]


def test_the_first_publish_expects_no_manifest(where):
    bank = two_builds(f"{where}/bank")
    with pytest.raises(PublishConflict):  # a publisher that saw no manifest must not replace one
        publish(bank, read_manifest(bank)["versions"], expect=None)


def Bank_tags(bank) -> dict:
    return {name: bank.tags(name).get("live") for name in ("refs", "memories")}
