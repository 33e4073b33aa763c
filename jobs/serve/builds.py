"""Which build a replica serves, and the switch to a newly published one between two batches.

The live manifest (storage/live.py) names the build readers must see. A replica reads it every
`serve.build_poll_s` in a thread of its own (an idle replica is on the new build before its next
request); when it names another build, that thread loads the build beside the one served (an
`Inference` pinned to it: its tables, the model its memories name, the memory store whose lineage
check refuses another model's memories) and warms it with one short decode. The next batch
switches; every batch is decoded by exactly one build, so no request mixes two, and no request
waits for a load. A build that fails to load (another model's memories, a damaged table) is
logged once and not retried: the replica keeps serving the build it has, and `/health` says which it failed to load and why.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass

from storage.bank import Bank
from storage.live import read_manifest

log = logging.getLogger("ray.serve")


@dataclass
class Served:
    build: int | None  # the published build's number; None before any publish (latest tables)
    inference: object  # jobs.inference.engine.Inference
    loaded_at: float


def live_build(bank: Bank) -> int | None:
    manifest = read_manifest(bank)
    return manifest.get("build") if manifest else None


def load_build(cfg, build: int | None, warm_mode: str | None = None) -> Served:
    """An Inference of `build` (None: the bank as readers see it, no build published yet),
    with its store and retriever opened and one token decoded, so its first request pays nothing."""
    from jobs.inference.engine import Inference

    inf = Inference(cfg, build=build)
    mode = warm_mode or inf.ic.mode
    inf.generate([""], mode, max_new_tokens=1)
    return Served(build, inf, time.time())


class LiveBuild:
    def __init__(self, cfg, poll_s: float):
        self.cfg, self.poll_s = cfg, poll_s
        self.bank = Bank.of(cfg)
        self.current = load_build(cfg, live_build(self.bank))
        self.failed: dict[int, str] = {}
        self.switches = 0
        self._ready: Served | None = None
        self._loading: int | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        # a thread of its own reads the manifest: an idle replica is on the new build before
        # the next request arrives, instead of serving it the old one while it loads
        threading.Thread(target=self._watch, daemon=True, name="m3-live-build").start()

    def serving(self) -> Served:
        """The build the next batch is decoded by: the newly published one once it is loaded."""
        with self._lock:
            if self._ready is not None:
                old, self.current, self._ready = self.current, self._ready, None
                self.switches += 1
                log.info("m3 serve: switched from build %s to build %s", old.build, self.current.build)
            return self.current

    def poll(self) -> None:
        """Start loading the build the manifest names if it is not the one served or loading."""
        build = live_build(self.bank)
        with self._lock:
            pending = self._ready.build if self._ready is not None else self._loading
            if build in (self.current.build, pending) or build in self.failed or self._loading is not None:
                return
            self._loading = build
        self._load(build)

    def _watch(self) -> None:
        while not self._stop.wait(self.poll_s):
            try:
                self.poll()
            except Exception as e:  # noqa: BLE001 - a manifest unreadable for a moment: next poll
                log.warning("m3 serve: reading the live manifest failed: %s", e)

    def close(self) -> None:
        self._stop.set()

    def _load(self, build: int | None) -> None:
        t0 = time.perf_counter()
        try:
            served = load_build(self.cfg, build)
        except Exception as e:  # noqa: BLE001 - keep serving the build there is; say why once
            log.error("m3 serve: build %s cannot be served, staying on build %s: %s", build, self.current.build, e)
            with self._lock:
                self.failed[build] = str(e)
                self._loading = None
            return
        log.info("m3 serve: build %s loaded in %.1f s", build, time.perf_counter() - t0)
        with self._lock:
            self._ready, self._loading = served, None
