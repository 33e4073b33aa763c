"""Keeping a rebuilt bank from growing without bound.

Every rebuild writes new versions, and Lance keeps every old version's files until told
otherwise (that is what makes time travel and pinned readers work). `apply_retention` is the one
place versions are deleted, after each publish of `m3 rebuild` and `m3 run` (jobs/ops/publish.py:
never when the publish was refused) and by `m3 bank compact`. Per table
it keeps
- the versions named by the newest `keep_builds` published builds (a reader opened on a recent
  build keeps working: Bank(uri, live=True) pins the versions it read from the manifest);
- every version at or after the live one (a rebuild or stage in progress writes newer versions);
- the `live` tag's version, and, with keep_tags (`m3 bank compact`), every tagged version: a tag
  is how a user keeps a build forever;
and deletes the rest with their files (Lance cleanup_old_versions). Without keep_tags (the
rebuild), tags on deleted versions go first: the stage runner tags each write, and a tag pins its
version's files forever. A reader pinned to a deleted version (an older build than the kept ones)
fails on its next read with Lance's "version not found"/missing-file error; it must reopen.

`compact` merges small fragments into large ones (Lance compact_files). A full build writes a
table in one streaming write; an incremental rebuild adds a fragment to each derived table and
shares the rest with the builds before (storage/table_delta.py), so fragments pile up one per
rebuild: the rebuild merges memories' once there are more than jobs/ops/rebuild.py MAX_FRAGMENTS,
and `m3 bank compact` merges every table's. A merge rewrites what it merges, so the builds
before it no longer share those files.
"""

from __future__ import annotations

from pathlib import Path

import lance

from storage.bank import LATEST, Bank, BankError
from storage.live import TAG, numbered, publish, read_manifest
from storage.slab import SlabError, ensure_slab
from storage.slab import prune as prune_slabs


def compact(uri: str, min_fragments: int = 2) -> int | None:
    """Compact the table at `uri` if it has at least `min_fragments` fragments; return the new
    version, or None if nothing was done."""
    ds = lance.dataset(uri)
    if len(ds.get_fragments()) < min_fragments:
        return None
    ds.optimize.compact_files()
    return lance.dataset(uri).version


def kept_builds(manifest: dict, keep_builds: int) -> list[dict]:
    """The history entries whose versions retention keeps (the newest `keep_builds`)."""
    return manifest.get("history", [])[-keep_builds:] or [{"versions": manifest["versions"]}]


def kept_versions(ds, table: str, manifest: dict, keep_builds: int, keep_tags: bool) -> set[int]:
    """The versions of `table` (open as Lance dataset `ds`) that retention keeps."""
    live = manifest["versions"][table]
    keep = {h["versions"][table] for h in kept_builds(manifest, keep_builds) if table in h["versions"]}
    tags = {t: info["version"] for t, info in ds.tags.list().items()}
    keep |= {v for t, v in tags.items() if keep_tags or t == TAG}
    return keep | {v["version"] for v in ds.versions() if v["version"] >= live}


def apply_retention(bank: Bank, manifest: dict, keep_builds: int, keep_tags: bool = False) -> dict[str, dict]:
    """Delete every version (and its files) that no kept build, tag or newer-than-live write
    holds (see the module docstring). Returns per table what was removed."""
    out = {}
    for table in manifest["versions"]:
        ds = bank.dataset(table, LATEST, check=False)
        keep = kept_versions(ds, table, manifest, keep_builds, keep_tags)
        dropped_tags = []
        for tag, info in ds.tags.list().items():
            if tag != TAG and info["version"] not in keep:
                ds.tags.delete(tag)  # only without keep_tags: kept_versions holds every tag's version then
                dropped_tags.append(tag)
        old = [v["version"] for v in ds.versions() if v["version"] not in keep]
        if not old:
            continue
        # delete_unverified stays off: files no version references may belong to a write in
        # progress (every command that writes takes the bank's write lock, jobs/ops/lock.py, but
        # a server writing memories back does not); Lance removes them once they are 7 days
        # old, which is when a crashed write's leftovers go
        stats = ds.cleanup_old_versions(versions=old, error_if_tagged_old_versions=False)
        out[table] = {"versions_removed": len(old), "bytes_removed": stats.bytes_removed, "tags_removed": dropped_tags}
    if "memories" in manifest["versions"]:
        # a dropped version's payload slab goes with it (storage/slab.py)
        ds = bank.dataset("memories", LATEST, check=False)
        gone = prune_slabs(bank, [v["version"] for v in ds.versions()])
        if gone:
            out.setdefault("memories", {"versions_removed": 0, "bytes_removed": 0, "tags_removed": []})[
                "slabs_removed"
            ] = gone
    return out


def compact_bank(bank: Bank, keep_builds: int, min_fragments: int = 2) -> dict:
    """`m3 bank compact` (the caller holds the rebuild lock): merge the fragments of each live
    table that is not behind a newer write, publish the compacted versions (same rows) as a new
    build, then apply retention keeping tags.

    Readers: one opened on the live build before this (Bank(uri, live=True) pins its versions)
    keeps reading it: that build stays a kept one (retention here keeps one build more when a
    compacted build was published, so even keep_builds=1 keeps it until the next rebuild). A
    reader pinned to a build older than the kept ones fails on its next read, as after a rebuild.
    """
    manifest = read_manifest(bank)
    if not manifest:
        raise BankError(f"bank {bank.uri} has no published build: nothing to compact (run `m3 rebuild`)")
    live = manifest["versions"]
    compacted, skipped = {}, []
    for table, version in live.items():
        if bank.dataset(table, LATEST, check=False).latest_version != version:
            skipped.append(table)  # a newer, unpublished write: compacting it would publish it
            continue
        if (new := compact(bank.layout.table(table), min_fragments)) is not None:
            compacted[table] = {"from": version, "to": new}
    keep = keep_builds
    if compacted:
        build = numbered(manifest["history"])[-1]["build"] if manifest.get("history") else None
        info = {k: manifest[k] for k in ("ingest_key", "encode_key") if k in manifest}
        versions = {**live, **{t: c["to"] for t, c in compacted.items()}}
        manifest = publish(bank, versions, {**info, "compacted_from": manifest.get("build", build)})
        keep += 1
    if "memories" in compacted:  # the compacted version is the live one now: give it its slab
        try:
            ensure_slab(bank, compacted["memories"]["to"])
        except SlabError:
            pass  # payloads of mixed sizes (not a bank the encode stage wrote): readers use Lance
    retention = apply_retention(bank, manifest, keep, keep_tags=True)
    return {
        "compacted": compacted,
        "skipped_newer_write": skipped,
        "build": manifest.get("build"),
        "retention": retention,
    }


def table_files(bank: Bank, table: str) -> int:
    """Files on disk under a table's directory (what retention keeps in check)."""
    return sum(1 for p in Path(bank.layout.table(table)).rglob("*") if p.is_file())
