"""The corpus of bench/scale.py: FOLDOC entries replicated with deterministic word-level variation.

Why FOLDOC: it is the bank the project ships and measures everywhere else (the demo, the
rebuild and fetch benches), real reference text of the kind a Memory³ bank holds (short
encyclopedic definitions with identifiers, cross-references and prose), and its length mix
(6-word one-liners to multi-paragraph entries) gives the real mix of 1-reference and
several-reference documents. 12,383 entries give ~18k references; larger banks need copies.

Why the variation: an exact copy is dropped by exact dedup and a lightly edited one by the
MinHash LSH (word 5-grams, 14 bands x 8 rows: candidates from Jaccard ~0.7). Every document,
copy 0 included, is its entry with each word replaced, with probability P_SWAP, by a word drawn
from FOLDOC's own word stream (so by frequency: stop words stay stop words about as often as in
the text, identifiers stay identifiers); two copies then share a 5-gram with probability
(1 - P_SWAP)^10 ~ 0.06, far below the LSH's threshold, while the text keeps FOLDOC's vocabulary,
word lengths and document lengths (what tokenizing, chunking, embedding and encoding cost
depends on). Document i is entry perm[i % 12,383] (a fixed permutation, so any size samples
the whole dictionary, not its first letters) in copy i // 12,383, seeded by i: the corpus of
size N is a prefix of the corpus of size 10 N, and the same N gives the same bytes.

Every TRAIN_EVERY-th document goes to a second file with role `both` (training text and bank),
the rest to a `bank`-only file: training sequences, and with them the pair stage's queries, are
a fixed share of the corpus at every size ("pair on a sample").
"""

from __future__ import annotations

import gzip
import json
import random
from pathlib import Path

FOLDOC = Path(__file__).resolve().parents[1] / "data" / "foldoc" / "foldoc.jsonl.gz"
P_SWAP = 0.25
TRAIN_EVERY = 10
EDIT = " This entry was revised for the scale benchmark."


def foldoc() -> list[dict]:
    with gzip.open(FOLDOC, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f]


class Corpus:
    def __init__(self, seed: int = 0):
        self.entries = foldoc()
        self.perm = list(range(len(self.entries)))
        random.Random(seed).shuffle(self.perm)
        # the whole word stream: a uniform draw from it is a draw by frequency
        self.words = [w for e in self.entries for w in e["text"].split()]

    def document(self, i: int) -> dict:
        n = len(self.entries)
        entry = self.entries[self.perm[i % n]]
        rng = random.Random(i * 7919 + 17)
        words = [rng.choice(self.words) if rng.random() < P_SWAP else w for w in entry["text"].split()]
        return {"id": f"{entry['id']}~{i // n}", "text": " ".join(words)}

    def write(self, directory: Path, n_docs: int, edit_every: int = 0, revision: int = 0) -> tuple[Path, Path]:
        """(training-and-bank file, bank-only file) of the first n_docs documents; edit_every > 0
        appends EDIT to every edit_every-th document (the 1 % edit of the incremental rebuild);
        revision r > 0 edits the first r of every edit_every documents, each the same way in
        every revision, so revision r changes 1 % more than r - 1 and leaves its edits as they
        were (successive 1 % edits)."""
        directory.mkdir(parents=True, exist_ok=True)
        both, bank = directory / "train.jsonl.gz", directory / "bank.jsonl.gz"
        # compresslevel 1: the corpus is rewritten for the edit; gzip's default level is most of that time
        with gzip.open(both, "wt", compresslevel=1) as fb, gzip.open(bank, "wt", compresslevel=1) as fk:
            for i in range(n_docs):
                doc = self.document(i)
                if edit_every and (i % edit_every < revision if revision else i % edit_every == 0):
                    doc["text"] += EDIT + (f" (revision {i % edit_every + 1})" if revision else "")
                (fb if i % TRAIN_EVERY == 0 else fk).write(json.dumps(doc) + "\n")
        return both, bank
