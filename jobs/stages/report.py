"""The short report each run ends with, computed from what was committed (not from what the
workers said they did), so it is right after a resume too."""

from __future__ import annotations

import contextlib
import json
import time

import numpy as np
import pyarrow.compute as pc

from pipelines.assemble import reason_counts
from pipelines.readers import RANK_BITS, ROLES
from storage.staging import write_text_atomic


class Report:
    def __init__(self, job: str):
        self.job = job
        self.started = time.time()
        self.values: dict = {}
        self.stages: dict[str, float] = {}
        self.notes: list[str] = []
        # the role of each input file, by its index (corpus.roles; readers.SourceFile.role)
        self.file_roles: list[str] = []

    def set(self, **values) -> None:
        self.values.update(values)

    def elapsed(self) -> float:
        return round(time.time() - self.started, 3)

    def note(self, text: str) -> None:
        self.notes.append(text)
        print(f"[{self.job}] {text}", flush=True)

    @contextlib.contextmanager
    def stage(self, name: str):
        t0 = time.time()
        print(f"[{self.job}] {name} ...", flush=True)
        yield
        self.stages[name] = round(time.time() - t0, 3)

    def finish(self, bank, cfg) -> dict:
        docs = bank.dataset("documents")
        rejects = bank.dataset("rejects").to_table(columns=["reason", "stage", "rank"])
        refs = bank.dataset("refs").to_table(columns=["n_tokens"])
        seqs = bank.dataset("train_sequences")
        seconds = round(time.time() - self.started, 3)
        flags = docs.to_table(columns=["n_chars", "in_training", "in_bank", "rank"])
        doc_bytes = pc.sum(flags["n_chars"]).as_py() or 0
        bank_chars = pc.sum(flags.filter(flags["in_bank"])["n_chars"]).as_py() or 0
        by_reason = reason_counts(rejects.to_batches())
        summary = {
            **self.values,
            "documents": docs.count_rows(),
            "rejected": rejects.num_rows,
            "duplicates": sum(v for k, v in by_reason.items() if k.startswith("duplicate_")),
            "rejects_by_reason": by_reason,
            "references": refs.num_rows,
            "reference_tokens": pc.sum(refs["n_tokens"]).as_py() or 0,
            "train_sequences": seqs.count_rows(),
            "kept_chars": doc_bytes,
            # the knowledge base's share of the corpus: documents (and characters) that became references
            "bank_documents": pc.sum(flags["in_bank"]).as_py() or 0,
            "bank_only_documents": flags.num_rows - (pc.sum(flags["in_training"]).as_py() or 0),
            "bank_chars": bank_chars,
            # per source role (corpus.roles): files, documents kept (and of them in the bank, in
            # training), records rejected
            "by_role": self.by_role(flags, rejects),
            "seconds": seconds,
            "stage_seconds": self.stages,
            # rates over the stages' work: Ray's start-up is a cost per cluster, not per corpus
            "mb_per_s": round(self.values.get("input_bytes", 0) / 2**20 / max(sum(self.stages.values()), 1e-9), 3),
            "docs_per_s": round(self.values.get("records_read", 0) / max(sum(self.stages.values()), 1e-9), 1),
        }
        summary["accounted"] = summary["records_read"] == summary["documents"] + summary["rejected"]
        out = bank.layout.reports() / f"{self.job}-{self.values.get('ingest_key', 'run')}.json"
        write_text_atomic(out, json.dumps(summary, indent=2))
        print(render(summary))
        return summary

    def by_role(self, flags, rejects) -> dict[str, dict[str, int]]:
        """Counts per role of the source files, from the committed rows (a row's file is its
        rank's high bits); {} when the roles of the files are not known."""
        if not self.file_roles:
            return {}
        roles = np.asarray(self.file_roles, dtype=object)

        def of(ranks) -> np.ndarray:
            return roles[np.asarray(ranks.to_numpy(zero_copy_only=False), dtype=np.int64) >> RANK_BITS]

        doc_roles, reject_roles = of(flags["rank"]), of(rejects["rank"])
        in_bank = flags["in_bank"].to_numpy(zero_copy_only=False)
        in_training = flags["in_training"].to_numpy(zero_copy_only=False)
        out = {}
        for role in ROLES:
            mine = doc_roles == role
            if role in self.file_roles:
                out[role] = {
                    "files": self.file_roles.count(role),
                    "documents": int(mine.sum()),
                    "in_bank": int((mine & in_bank).sum()),
                    "in_training": int((mine & in_training).sum()),
                    "rejected": int((reject_roles == role).sum()),
                }
        return out


ROLE_NAMES = {"bank": "bank-only", "training": "training-only", "both": "both-role"}


def render(s: dict) -> str:
    lines = [
        "ingest report",
        f"  records read      {s['records_read']:>10,}   ({s['files']} file(s), {s['shards']} shard(s))",
        f"  documents kept    {s['documents']:>10,}",
        f"  rejected          {s['rejected']:>10,}   (of which duplicates {s['duplicates']:,})",
    ]
    lines += [f"    {reason:<28}{n:>8,}" for reason, n in s["rejects_by_reason"].items()]
    lines += [
        f"  accounting        {'OK' if s['accounted'] else 'MISMATCH'}: read = kept + rejected",
        f"  in the bank       {s['bank_documents']:>10,}   documents ({s['bank_documents'] / max(s['records_read'], 1):.1%} "
        f"of the records read; {s['bank_only_documents']:,} only in the bank, not in training)",
    ]
    if set(s.get("by_role") or {}) - {"both"}:  # a corpus of both-role sources says nothing new here
        lines += [
            f"  {'from ' + ROLE_NAMES[role]:<18}{r['documents']:>10,}   documents ({r['in_bank']:,} in the bank, "
            f"{r['in_training']:,} in training; {r['rejected']:,} rejected; {r['files']} file(s))"
            for role, r in s["by_role"].items()
        ]
    lines += [
        f"  references        {s['references']:>10,}   ({s['reference_tokens']:,} tokens)",
        f"  train sequences   {s['train_sequences']:>10,}",
        f"  time              {s['seconds']:>10.1f} s  (stages: {s['mb_per_s']:.2f} MB/s of input files, "
        f"{s['docs_per_s']:,.0f} records/s)",
        "  stages            " + ", ".join(f"{k} {v:.1f}s" for k, v in s["stage_seconds"].items()),
    ]
    return "\n".join(lines)
