"""Where everything of a bank lives, from its URI: the one place that spells the layout.

    <bank>/<table>.lance            LanceDB tables (documents, refs, memories, ...)
    <bank>/_live.json               the live manifest (storage/live.py)
    <bank>/_staging/<job>/          a running job's resumable shard files
    <bank>/_reports/                stage and run reports
    <bank>/_runs/                   summaries of scheduled runs
    <bank>/_<what>.lock             a job's lock (jobs/ops/lock.py)
    <bank>/_warm/<key>/*.parquet    memories of cold references written back at serving (storage/warm.py)
    <bank>/_slabs/<table>/v<N>.*    flat payload copy of a memories version, local banks only (storage/slab.py)
    <bank>/_memo/                   ingest's per-record memo of the last build (pipelines/memo.py)
    <bank>/training/<stage>/        checkpoints, log and exported model of a training stage
    <bank>/models/                  initial models the encoder used (no trained one yet)
    <bank>/tokenizers/<hash>.json   the pinned tokenizer
    <bank>/quantizers/<hash>.faiss  vector quantizers of the vq codec
    <bank>/eval/                    `m3 eval` results

A bank is a local directory or a URI (`s3://bucket/bank`, `file:///shared/bank`), and nothing
else (`check_bank_uri`: a path that is a file, or a URI of another scheme, is refused when the
config is loaded and when a Bank is opened). Every part
comes back as a `UPath` (universal_pathlib, on fsspec's filesystems): for a local bank that is
a plain `pathlib.Path`; for a URI it joins, tests and reads without mangling the scheme
(`Path("s3://b/bank")` would make it `s3:/b/bank`). Table locations are plain strings, which
Lance and pyarrow take for either. What DeepSpeed and torch write (training checkpoints, the
models the encoder starts from) needs a filesystem: asked of a bank on an object store, it fails
with an error naming the part. A job's lock is a file or an object (`lock`).
"""

from __future__ import annotations

from pathlib import Path

from upath import UPath

from model.errors import M3Error

MANIFEST = "_live.json"
# URI schemes a bank can live at, besides a local path: where the live manifest's and the lock's
# conditional writes are implemented (storage/conditional.py)
SCHEMES = ("file", "s3")


class LayoutError(M3Error, ValueError):
    """A part of the bank that needs a local directory, asked of a bank at a URI."""


def is_uri(location: str) -> bool:
    return "://" in str(location)


def check_bank_uri(uri: str) -> None:
    """LayoutError, naming the problem, for a bank location that cannot be one: a URI of a scheme
    other than SCHEMES, or a local path that is a file or lies inside one (which would otherwise
    fail deep inside LanceDB with "File exists")."""
    uri = str(uri)
    if is_uri(uri):
        scheme = uri.split("://", 1)[0]
        if scheme.lower() not in SCHEMES:
            raise LayoutError(
                f"{uri}: a bank cannot live at a {scheme}:// URI; it is a local path, a file:// or an s3:// URI"
            )
        if scheme.lower() != "file":
            return
        uri = uri[len("file://") :]
    path = Path(uri).expanduser()
    for place in (path, *path.parents):
        if place.exists():
            if not place.is_dir():
                inside = "" if place == path else f" (the bank would be inside it, at {path})"
                raise LayoutError(f"{place} is a file, not a directory{inside}: point the bank at a directory")
            return


def upath(location: str | Path) -> UPath:
    """A path object for a local path or a URI alike (a plain Path for a local one)."""
    return location if isinstance(location, UPath) else UPath(str(location))


class BankLayout:
    def __init__(self, uri: str | Path):
        self.uri = str(uri)
        self.root = upath(self.uri)

    def path(self, *parts: str) -> UPath:
        return self.root.joinpath(*parts)

    def table(self, name: str) -> str:
        return f"{self.uri.rstrip('/')}/{name}.lance"

    def local(self, *parts: str) -> Path:
        """A path inside the bank that local file APIs write; refused for a bank at an object
        store (a file:// URI is a local directory)."""
        if self.uri.startswith("file://"):
            return Path(self.root.path).joinpath(*parts)
        if is_uri(self.uri):
            raise LayoutError(
                f"{'/'.join(parts) or 'this'} of the bank at {self.uri} needs a local directory: "
                f"keep the bank on a local or shared filesystem path"
            )
        return Path(self.uri).joinpath(*parts)

    def manifest(self) -> UPath:
        return self.path(MANIFEST)

    def staging(self, job: str) -> UPath:
        return self.path("_staging", job)

    def reports(self) -> UPath:
        return self.path("_reports")

    def runs(self) -> UPath:
        return self.path("_runs")

    def warm(self, key: str) -> UPath:
        return self.path("_warm", key)

    def memo(self) -> UPath:
        return self.path("_memo")

    def slabs(self, table: str) -> Path:
        """Payload slabs of a table's versions: memory-mapped, so a local directory only."""
        return self.local("_slabs", table)

    def on_object_store(self) -> bool:
        return is_uri(self.uri) and not self.uri.startswith("file://")

    def lock(self, what: str) -> UPath:
        """A local file for a bank on a filesystem (taken by O_EXCL), an object for one on an
        object store (taken by a conditional PUT): jobs/ops/lock.py."""
        return self.path(f"_{what}.lock") if self.on_object_store() else self.local(f"_{what}.lock")

    def training(self, stage: str | None = None) -> Path:
        """Training inside the bank; Bank.training says where a stage trains (train.run_dir)."""
        return self.local("training", stage) if stage else self.local("training")

    def models(self) -> Path:
        return self.local("models")

    def tokenizers(self) -> UPath:
        return self.path("tokenizers")

    def quantizers(self) -> UPath:
        return self.path("quantizers")

    def eval(self) -> UPath:
        return self.path("eval")

    def relative(self, path: UPath | Path) -> str:
        """`path` relative to the bank (what lineage records, so a moved bank still resolves)."""
        root, full = str(self.root).rstrip("/") + "/", str(path)
        if not full.startswith(root):
            raise LayoutError(f"{full} is not inside the bank at {self.uri}")
        return full[len(root) :]
