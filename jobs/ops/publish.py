"""The one publish policy of every command that makes a build live: `m3 rebuild` and `m3 run`.

    _, token = manifest_state(cfg.bank.uri)     # when the build starts, under the write lock
    ...                                         # the stages, each returning the versions it wrote
    publish_build(cfg, versions, token, info, allow_shrink=args.allow_shrink)

1. check   what is published is exactly `versions`: the versions the command's stages wrote
           or found up to date and read, never "latest" (a write by anyone else meanwhile is
           not published); memories and embeddings built from another refs version than the
           one published are refused (`built_from`);
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

import lance

from jobs.config import Config
from model.errors import M3Error
from storage.bank import Bank
from storage.layout import BankLayout
from storage.live import publish, read_manifest
from storage.retention import apply_retention


class PublishRefused(M3Error, RuntimeError):
    """A build that must not become live (nothing was published; the live build is intact)."""


INTACT = "nothing was published and the live build is intact"


def _refs_rows(bank_uri: str, version: int) -> int:
    return lance.dataset(BankLayout(bank_uri).table("refs"), version=version).count_rows()


def check_same_refs(versions: dict[str, int], built_from: dict[str, int | None], what: str) -> None:
    """Refuse tables built from another refs version than the one published (a writer that
    took no lock replaced refs between the stages)."""
    other = {t: v for t, v in built_from.items() if v is not None and v != versions.get("refs")}
    if other:
        raise PublishRefused(f"refs changed during this {what}: it publishes refs version {versions.get('refs')}, but "
                             + ", ".join(f"{t} were built from refs version {v}" for t, v in other.items())
                             + f" (written by a process that does not take the bank's write lock?); {INTACT}: "
                               f"run the {what} again")


def check_shrink(cfg: Config, versions: dict[str, int], allow_shrink: bool) -> dict:
    """The shrink guard (step 2 of the module docstring); returns the counts it compared."""
    live = read_manifest(cfg.bank.uri)
    live_versions = (live or {}).get("versions", {})
    n_new = _refs_rows(cfg.bank.uri, versions["refs"])
    n_live = _refs_rows(cfg.bank.uri, live_versions["refs"]) if "refs" in live_versions else None
    counts = {"references": n_new, "live_references": n_live}
    if live_versions == versions:
        return counts  # the live build itself, published again: nothing changes
    where = (f"the live build (build {live.get('build')}) has {n_live} references" if n_live is not None
             else "there is no live build yet")
    if n_new == 0:
        raise PublishRefused(f"not publishing a build with 0 references ({where}): a build without references is "
                             f"never published, --allow-shrink or not; {INTACT}. Check corpus.paths (a corpus "
                             f"not fully downloaded?) and the bank_quality filters")
    max_shrink = cfg.rebuild.max_shrink
    if n_live and n_new < (1 - max_shrink) * n_live and not allow_shrink:
        raise PublishRefused(f"not publishing: the live build has {n_live} references, this one would have {n_new} "
                             f"(below {1 - max_shrink:.0%} of them, rebuild.max_shrink={max_shrink}); {INTACT}. "
                             f"If the corpus shrank on purpose, run again with --allow-shrink (or raise "
                             f"rebuild.max_shrink)")
    return counts


def publish_build(cfg: Config, versions: dict[str, int], token, info: dict | None = None, *,
                  allow_shrink: bool = False, built_from: dict[str, int | None] | None = None,
                  what: str = "build") -> dict:
    """Publish `versions` as the live build if the policy allows (the module docstring); the
    caller holds the bank's write lock and read `token` (storage.live.manifest_state) when its
    build started. Returns the manifest, the retention done and the reference counts."""
    check_same_refs(versions, built_from or {}, what)
    counts = check_shrink(cfg, versions, allow_shrink)
    manifest = publish(Bank(cfg.bank.uri), versions, info, expect=token)
    retention = apply_retention(cfg.bank.uri, manifest, cfg.rebuild.keep_builds)
    return {"manifest": manifest, "retention": retention, **counts}
