"""The `rebuild:` and `schedule:` sections of the pipeline YAML (jobs/ops/rebuild.py, jobs/ops/schedule.py).

Typed fields with range metadata, checked in __post_init__ (model.checked) like every other
section, whether loaded from YAML or built in code; the cron expression is parsed there too, so a
bad one fails at load time naming `schedule.cron`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from jobs.config.cron import Cron, CronError
from model.checked import FieldError, check_fields


@dataclass(frozen=True)
class RebuildConfig:
    # Published builds whose table versions are kept (readers pinned to a recent build keep
    # working); older versions are deleted and their files removed after each rebuild.
    keep_builds: int = field(default=3, metadata={"ge": 1, "le": 30})
    # Also bring the embeddings table up to date (incrementally: they depend only on the text).
    embeddings: bool = True
    # Rebuild with the tokenizer of the bank's live build (when tokenizer.path is null), so an
    # unchanged document keeps its token ids; retraining the BPE on a changed corpus would
    # change every reference and force a full re-encode.
    pin_tokenizer: bool = True
    # A lock taken on another host is considered stale after this long (same-host locks are
    # checked by pid): set it above the longest rebuild.
    lock_stale_s: float = field(default=24 * 3600.0, metadata={"gt": 0})
    # Refuse to publish a build whose refs table has fewer than (1 - max_shrink) of the live
    # build's references (0.5: refuse below half), unless told to (`--allow-shrink` on `m3 rebuild`
    # and `m3 run`): a half-downloaded corpus must not replace the live build, nor let retention
    # delete the builds before it. 1 refuses nothing; a build with 0 references is never published.
    max_shrink: float = field(default=0.5, metadata={"ge": 0, "le": 1})
    # After each rebuild also run `m3 bank compact` (merge fragments, publish the compacted
    # build, delete versions no kept build or tag holds) while still holding the lock.
    compact_after: bool = False

    def __post_init__(self):
        check_fields(self)


@dataclass(frozen=True)
class ScheduleConfig:
    # When `m3 schedule` runs a rebuild: 5 cron fields (minute hour day month weekday), or 6
    # with a seconds field first; local time.
    cron: str = "0 3 * * *"
    # Ray Jobs API address (http://head:8265): each run is submitted as a Ray job. null = each
    # run in the scheduler's own process, on the config's `ray:` cluster.
    address: str | None = None
    # A failed run is retried this many times, waiting backoff_s, 2*backoff_s, ... (capped).
    max_retries: int = field(default=3, metadata={"ge": 0})
    backoff_s: float = field(default=60.0, metadata={"ge": 0})
    backoff_max_s: float = field(default=3600.0, metadata={"ge": 0})

    def __post_init__(self):
        check_fields(self)
        try:
            Cron.parse(self.cron)
        except CronError as e:
            raise FieldError("cron", str(e)) from None
