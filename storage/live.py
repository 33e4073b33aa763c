"""The bank's `live` pointer: which version of each table readers should use.

A rebuild writes new versions of several tables (refs, memories, embeddings, ...). Each write is
atomic per table, but a reader that opened refs after the rebuild wrote it and memories before
would see references without memories. So readers do not follow "latest": they follow `live`,
one small JSON manifest `<bank>/_live.json` naming a version per table, replaced atomically
once every table of the build is written (a rename on a filesystem, one PUT on an object store).
That write is the commit point of a rebuild; a build killed before it is invisible to readers.
It is a compare-and-swap (storage/conditional.py: `If-Match` on S3, a compare under an flock
locally): it happens only if the manifest is still the one the publisher read, so two publishers
(a rebuild whose lock was taken over as stale, a compaction) cannot overwrite each other's
build; the loser gets a PublishConflict and nothing of its build becomes live.

Each table also gets a Lance tag `live` on the same version, moved after the manifest, so
`m3 bank stats`, LanceDB and Lance tools show it; the manifest is the source of truth (tags are
per table, so moving several is not atomic). The manifest keeps a short history of published
builds: retention (storage/retention.py) keeps the versions they name.

Each published build gets a number at publish time (1, 2, ...; never reused, so `m3 sql --build 7`
and `m3 bank diff 6 7` mean the same build next month). Manifests written before numbers existed
are numbered by position in their history, and those numbers are written down at the next publish.
"""

from __future__ import annotations

import json
import time

from model.errors import M3Error
from storage.conditional import PreconditionFailed, read_versioned, write_if

TAG = "live"
HISTORY = 32  # published builds remembered; retention keeps the newest `keep_builds` of them


# `bank` below is a storage.bank.Bank, not imported: a Bank reads its live pins through here
def read_manifest(bank) -> dict | None:
    """The manifest ({"versions": {table: version}, "history": [...], ...}) or None before the
    first published build."""
    try:
        return json.loads(bank.layout.manifest().read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None


class PublishConflict(M3Error, RuntimeError):
    """The live manifest changed between the publisher's read and its write."""


def manifest_state(bank) -> tuple[dict | None, str | None]:
    """The manifest and its version token (what `publish(expect=...)` compares), (None, None)
    before the first published build."""
    got = read_versioned(bank.layout.manifest())
    return (None, None) if got is None else (json.loads(got[0]), got[1])


def live_versions(bank) -> dict[str, int]:
    manifest = read_manifest(bank)
    return dict(manifest["versions"]) if manifest else {}


# what a history entry remembers of a build: its versions, when, and the lineage keys `m3 bank diff`
# and the `builds` view show
RECORD = ("build", "versions", "published_at", "ingest_key", "encode_key", "compacted_from")


def numbered(history: list[dict]) -> list[dict]:
    """The history with every entry's build number (entries written before numbers existed get
    their 1-based position)."""
    return [{**h, "build": h.get("build", i + 1)} for i, h in enumerate(history)]


_AS_READ = object()


def _conflict(bank, since: str) -> PublishConflict:
    now = read_manifest(bank) or {}
    return PublishConflict(
        f"the live build of {bank.uri} changed {since} (it is now build {now.get('build')}, "
        f"published at {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(now.get('published_at', 0)))}"
        f"{' by ' + now['by'] if now.get('by') else ''}): not publishing over it; run again to "
        f"build on top of it"
    )


def publish(bank, versions: dict[str, int], info: dict | None = None, expect=_AS_READ) -> dict:
    """Make `versions` the live build: replace the manifest if it is still the one read (by
    this call, or, with `expect`, the version token of `manifest_state` the caller read before
    building), then move the tags. Raises PublishConflict if another publisher came between.

    Idempotent: publishing the live build again only re-moves tags a crash left behind."""
    old, token = manifest_state(bank)
    if expect is not _AS_READ and token != expect:
        raise _conflict(bank, "since this build started")
    old = old or {"history": []}
    numbers = numbered(old.get("history", []))
    history = [h for h in numbers if h["versions"] != versions]
    entry = {
        "versions": dict(versions),
        "published_at": time.time(),
        **(info or {}),
        "build": max([h["build"] for h in numbers], default=0) + 1,
    }
    if old.get("versions") == versions:  # same build: keep its original record, do not grow the history
        same = [h["build"] for h in numbers if h["versions"] == versions]
        entry = {**old, "build": old.get("build", same[-1] if same else entry["build"])}
    entry.pop("history", None)
    record = {k: entry[k] for k in RECORD if k in entry}
    manifest = {**entry, "history": (history + [record])[-HISTORY:]}
    try:
        write_if(
            bank.layout.manifest(), json.dumps(manifest, indent=1, sort_keys=True, default=str).encode("utf-8"), token
        )
    except PreconditionFailed:
        raise _conflict(bank, "while this build was being published") from None
    for name, version in versions.items():
        if bank.tags(name).get(TAG) != version:
            bank.tag(name, TAG, version)
    return manifest
