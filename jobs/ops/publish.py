"""The one publish policy of every command that makes a build live: `m3 rebuild` and `m3 run`.

    _, token = manifest_state(bank)             # when the build starts, under the write lock
    found = found_versions(bank)                # m3 run: what a stage it does not run leaves
    ...                                         # the stages, each returning what it wrote
    publish_build(bank, cfg, stage_versions(results, found), token, allow_shrink=...,
                  built_from=built_from(results))

0. gather  `stage_versions`: the versions the command's stages wrote or found up to date (the
           ingest tables, memories, embeddings), and, for a stage the command did not run
           (`m3 run --only/--from`), the version there when it started; never "latest" (a
           write by anyone else meanwhile is not published);
1. check   every table has a version; the tables come from one ingest (no mixed build);
           memories and embeddings built from another refs version than the one published are
           refused (`built_from`);
2. guard   a build with 0 references is never published; one with fewer than
           (1 - rebuild.max_shrink) of the live build's references is refused unless
           `allow_shrink` (`--allow-shrink`): a rebuild of a half-downloaded corpus must not
           replace the live build, and retention must not then delete the builds before it.
           The refusal is one line (PublishRefused, an M3Error: the CLI exits 2) saying both
           counts, that nothing was published, and how to override;
3. publish the `live` manifest, compare-and-swap against `token` (storage/live.py): if
           another publisher came between, PublishConflict and nothing of this build is live;
4. retain  retention with rebuild.keep_builds (storage/retention.py), only after a publish.
"""

from __future__ import annotations

import json

from jobs.config import Config
from jobs.faults import maybe_crash
from jobs.stages.ingest import TABLES as INGEST_TABLES
from model.errors import M3Error
from storage.bank import META_KEY, Bank, BankError
from storage.live import publish, read_manifest
from storage.retention import apply_retention


class PublishRefused(M3Error, RuntimeError):
    """A build that must not become live (nothing was published; the live build is intact)."""


INTACT = "nothing was published and the live build is intact"


def _refs_rows(bank: Bank, version: int) -> int:
    return bank.dataset("refs", version=version, check=False).count_rows()  # a count: no data file is read


def stage_versions(
    results: dict[str, dict], found: dict[str, int] | None = None, embeddings: bool = True
) -> dict[str, int | None]:
    """Step 0: the version of each published table, from the stages' results (`ingest`,
    `encode`, `embed`) over the versions `found` when the command started; `embeddings`: the
    command publishes that table (a rebuild with rebuild.embeddings false does not). A table
    of neither is None, which `publish_build` refuses."""
    tables = [*INGEST_TABLES, "memories", *(["embeddings"] if embeddings else [])]
    built = dict((results.get("ingest") or {}).get("versions") or {})
    for stage, table in (("encode", "memories"), ("embed", "embeddings")):
        if (results.get(stage) or {}).get("version") is not None:
            built[table] = results[stage]["version"]
    versions = {**(found or {}), **built}
    return {n: versions.get(n) for n in tables}


def found_versions(bank: Bank) -> dict[str, int]:
    """The version of each table there is (read under the write lock when a command starts)."""
    return {n: bank.table(n).version for n in (*INGEST_TABLES, "memories", "embeddings") if bank.has(n)}


def built_from(results: dict[str, dict]) -> dict[str, int | None]:
    """The refs version the memories and embeddings of `results` were built from."""
    return {
        "memories": (results.get("encode") or {}).get("refs_version"),
        "embeddings": (results.get("embed") or {}).get("refs_version"),
    }


def check_complete(bank: Bank, versions: dict[str, int | None], what: str) -> dict:
    """Every table has a version, all of one ingest; returns the lineage keys the manifest
    records (ingest_key, encode_key)."""
    missing = [n for n, v in versions.items() if v is None]
    if missing:
        bank.require(*missing)  # names the command that makes each
        raise BankError(
            f"not publishing: no version of {', '.join(missing)} (written by another process during this {what}?)"
        )
    keys = {
        n: _lineage(bank, n, versions[n]).get("ingest_key") for n in ("refs", "memories", "embeddings") if n in versions
    }
    if len(set(keys.values())) != 1:
        raise BankError(
            f"not publishing a mixed build: the tables come from different ingests {keys}; "
            f"run the stages that are behind (m3 run --from embed)"
        )
    return {
        "ingest_key": keys["refs"],
        "encode_key": _lineage(bank, "memories", versions["memories"]).get("encode_key"),
    }


def _lineage(bank: Bank, name: str, version: int) -> dict:
    """The lineage of the version published, not of the latest. Read from the manifest without
    the file check: a damaged table is for `m3 bank verify` and the rebuild's intact check to
    name, after the policy (as before this check was shared)."""
    meta = bank.dataset(name, version=version, check=False).schema.metadata or {}
    return json.loads(meta[META_KEY]) if META_KEY in meta else {}


def check_same_refs(versions: dict[str, int], built_from: dict[str, int | None], what: str) -> None:
    """Refuse tables built from another refs version than the one published (a writer that
    took no lock replaced refs between the stages)."""
    other = {t: v for t, v in built_from.items() if v is not None and v != versions.get("refs")}
    if other:
        raise PublishRefused(
            f"refs changed during this {what}: it publishes refs version {versions.get('refs')}, but "
            + ", ".join(f"{t} were built from refs version {v}" for t, v in other.items())
            + f" (written by a process that does not take the bank's write lock?); {INTACT}: "
            f"run the {what} again"
        )


def check_shrink(bank: Bank, cfg: Config, versions: dict[str, int], allow_shrink: bool) -> dict:
    """The shrink guard (step 2 of the module docstring); returns the counts it compared."""
    live = read_manifest(bank)
    live_versions = (live or {}).get("versions", {})
    n_new = _refs_rows(bank, versions["refs"])
    n_live = _refs_rows(bank, live_versions["refs"]) if "refs" in live_versions else None
    counts = {"references": n_new, "live_references": n_live}
    if live_versions == versions:
        return counts  # the live build itself, published again: nothing changes
    where = (
        f"the live build (build {live.get('build')}) has {n_live} references"
        if n_live is not None
        else "there is no live build yet"
    )
    if n_new == 0:
        raise PublishRefused(
            f"not publishing a build with 0 references ({where}): a build without references is "
            f"never published, --allow-shrink or not; {INTACT}. Check corpus.paths (a corpus "
            f"not fully downloaded?) and the bank_quality filters"
        )
    max_shrink = cfg.rebuild.max_shrink
    if n_live and n_new < (1 - max_shrink) * n_live and not allow_shrink:
        raise PublishRefused(
            f"not publishing: the live build has {n_live} references, this one would have {n_new} "
            f"(below {1 - max_shrink:.0%} of them, rebuild.max_shrink={max_shrink}); {INTACT}. "
            f"If the corpus shrank on purpose, run again with --allow-shrink (or raise "
            f"rebuild.max_shrink)"
        )
    return counts


def publish_build(
    bank: Bank,
    cfg: Config,
    versions: dict[str, int | None],
    token,
    info: dict | None = None,
    *,
    allow_shrink: bool = False,
    built_from: dict[str, int | None] | None = None,
    what: str = "build",
) -> dict:
    """Publish `versions` (`stage_versions`) as the live build if the policy allows (the module
    docstring); the caller holds the bank's write lock and read `token`
    (storage.live.manifest_state) when its build started. `info`: what the manifest records
    besides the versions and lineage keys (who published). Returns the manifest, the retention
    done and the reference counts."""
    maybe_crash("publish", 1)  # the kill-before-publish test: readers must still see the old build
    keys = check_complete(bank, versions, what)
    check_same_refs(versions, built_from or {}, what)
    counts = check_shrink(bank, cfg, versions, allow_shrink)
    manifest = publish(bank, versions, {**(info or {}), **keys}, expect=token)
    retention = apply_retention(bank, manifest, cfg.rebuild.keep_builds)
    return {"manifest": manifest, "retention": retention, **counts}
