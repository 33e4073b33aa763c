"""Keeping a rebuilt bank from growing without bound.

Every rebuild writes new versions, and Lance keeps every old version's files until told
otherwise (that is what makes time travel and pinned readers work). After a build is published,
`apply_retention` keeps the versions named by the newest `keep_builds` published builds (a
reader opened on a recent build keeps working) and everything after the oldest of them, and
deletes the rest: their tags (except `live`) and then their files (Lance cleanup_old_versions).

`compact` merges small fragments into large ones (Lance compact_files). Our writes replace a
whole table in one streaming write, so fragments rarely pile up; compaction matters for tables
written in pieces, and is cheap when there is nothing to do.
"""

from __future__ import annotations

from pathlib import Path

import lance

from storage.live import TAG
from storage.layout import BankLayout


def compact(uri: str, min_fragments: int = 2) -> int | None:
    """Compact the table at `uri` if it has at least `min_fragments` fragments; return the new
    version, or None if nothing was done."""
    ds = lance.dataset(uri)
    if len(ds.get_fragments()) < min_fragments:
        return None
    ds.optimize.compact_files()
    return lance.dataset(uri).version


def apply_retention(bank_uri: str, manifest: dict, keep_builds: int) -> dict[str, dict]:
    """Delete the versions (and their files) older than the `keep_builds` newest published
    builds. Returns per table what was removed."""
    history = manifest.get("history", [])[-keep_builds:] or [{"versions": manifest["versions"]}]
    out = {}
    for table in manifest["versions"]:
        kept = [h["versions"][table] for h in history if table in h["versions"]]
        if not kept:
            continue
        keep_from = min(kept)
        ds = lance.dataset(BankLayout(bank_uri).table(table))
        dropped_tags = []
        for tag, info in ds.tags.list().items():
            if tag != TAG and info["version"] < keep_from:
                ds.tags.delete(tag)  # a tag pins its version's files forever
                dropped_tags.append(tag)
        old = [v["version"] for v in ds.versions() if v["version"] < keep_from]
        if not old:
            continue
        # delete_unverified stays off: files no version references may belong to a write in
        # progress (a plain `m3 encode` does not take the rebuild lock); Lance removes them once
        # they are 7 days old, which is when a crashed write's leftovers go
        stats = ds.cleanup_old_versions(versions=old, error_if_tagged_old_versions=False)
        out[table] = {"versions_removed": len(old), "bytes_removed": stats.bytes_removed, "tags_removed": dropped_tags}
    return out


def table_files(bank_uri: str, table: str) -> int:
    """Files on disk under a table's directory (what retention keeps in check)."""
    return sum(1 for p in Path(BankLayout(bank_uri).table(table)).rglob("*") if p.is_file())
