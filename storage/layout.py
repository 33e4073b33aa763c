"""Where everything of a bank lives, from its URI: the one place that spells the layout.

    <bank>/<table>.lance            LanceDB tables (documents, refs, memories, ...)
    <bank>/_live.json               the live manifest (storage/live.py)
    <bank>/_staging/<job>/          a running job's resumable shard files
    <bank>/_reports/                stage and run reports
    <bank>/_runs/                   summaries of scheduled runs
    <bank>/_<what>.lock             a job's lock (jobs/lock.py)
    <bank>/training/<stage>/        checkpoints, log and exported model of a training stage
    <bank>/models/                  initial models the encoder used (no trained one yet)
    <bank>/tokenizers/<hash>.json   the pinned tokenizer
    <bank>/quantizers/<hash>.faiss  vector quantizers of the vq codec
    <bank>/eval/                    `m3 eval` results

Table locations are strings joined with "/", right for a local path and for an object-store
URI alike (`Path("s3://b/bank")` would make it `s3:/b/bank`). Everything else is written with
local file APIs today, so it is a `Path` and a bank at a URI gets a clear error naming what
needs a local directory, instead of a mangled path.
"""

from __future__ import annotations

from pathlib import Path

from model.errors import M3Error

MANIFEST = "_live.json"


class LayoutError(M3Error, ValueError):
    """A part of the bank that needs a local directory, asked of a bank at a URI."""


def is_uri(location: str) -> bool:
    return "://" in str(location)


class BankLayout:
    def __init__(self, uri: str | Path):
        self.uri = str(uri)

    def table(self, name: str) -> str:
        return f"{self.uri.rstrip('/')}/{name}.lance"

    def local(self, *parts: str) -> Path:
        """A local path inside the bank; refused for a bank at a URI."""
        if is_uri(self.uri):
            raise LayoutError(f"{'/'.join(parts) or 'this'} of the bank at {self.uri} needs a local directory: "
                            f"keep the bank on a local or shared filesystem path")
        return Path(self.uri).joinpath(*parts)

    def manifest(self) -> Path:
        return self.local(MANIFEST)

    def staging(self, job: str) -> Path:
        return self.local("_staging", job)

    def reports(self) -> Path:
        return self.local("_reports")

    def runs(self) -> Path:
        return self.local("_runs")

    def lock(self, what: str) -> Path:
        return self.local(f"_{what}.lock")

    def training(self, stage: str | None = None) -> Path:
        return self.local("training", stage) if stage else self.local("training")

    def trained_model(self, stage: str) -> Path:
        return self.training(stage) / "model"

    def models(self) -> Path:
        return self.local("models")

    def tokenizers(self) -> Path:
        return self.local("tokenizers")

    def quantizers(self) -> Path:
        return self.local("quantizers")

    def eval(self) -> Path:
        return self.local("eval")
