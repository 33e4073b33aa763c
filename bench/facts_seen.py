"""Exact match split by whether the answer occurs in the training text: which skill a facts model
learned (picking among values it writes, or copying a string it never wrote).

    python bench/facts_seen.py BANK/eval/eval.json data/facts/probe.jsonl data/facts/train.jsonl.gz

Reads `m3 eval`'s per-item exact match of the first QA probe (eval.json) and searches each probe
answer as a whole word in the training-role files (jobs/inference/edits.py `seen_in`, what the edit
bench splits by). Prints, per mode, exact match where the answer occurs in the training text and
where it occurs in none (BENCHMARKS.md, "The same config on a corpus of fresh values").
"""

from __future__ import annotations

import gzip
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from jobs.inference.edits import seen_in  # noqa: E402


def read_jsonl(path: str) -> list[dict]:
    with (gzip.open if path.endswith(".gz") else open)(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def split(eval_json: str, probe: str, train: list[str]) -> dict:
    modes = json.loads(Path(eval_json).read_text())["qa"][0]["modes"]
    text = "\n".join(r["text"] for path in train for r in read_jsonl(path))
    seen = seen_in(text, [p["answer"] for p in read_jsonl(probe)])
    out = {}
    for mode, m in modes.items():
        hits = {True: [], False: []}
        for exact, s in zip(m["exact"], seen):
            hits[s].append(bool(exact))
        out[mode] = {k: (sum(v), len(v)) for k, v in (("seen", hits[True]), ("unseen", hits[False]))}
    return out


def main(argv=None) -> dict:
    a = argv or sys.argv[1:]
    if len(a) < 3:
        raise SystemExit(__doc__)
    out = split(a[0], a[1], a[2:])
    for mode, r in out.items():
        cells = [f"{k} {n}/{of} = {n / of:.1%}" if of else f"{k} n/a" for k, (n, of) in r.items()]
        print(f"{mode:40s} " + ", ".join(cells))
    return out


if __name__ == "__main__":
    main()
