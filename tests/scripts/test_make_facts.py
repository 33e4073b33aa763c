"""scripts/make_facts.py: the facts corpus generator (seeded; shared value pools or fresh values)."""

import gzip
import importlib.util
import json
import random
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
NAMED = ("birthplace", "river", "founder", "headquarters", "mined_near")  # values that are names


def _module():
    spec = importlib.util.spec_from_file_location("make_facts", ROOT / "scripts" / "make_facts.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _named_values(ents):
    return [e["values"][a] for e in ents for a in NAMED if a in e["values"]]


def test_pooled_values_repeat_across_entities_and_fresh_values_never_do():
    mf = _module()
    pooled = Counter(_named_values(mf.make_entities(2000, random.Random(0))))
    fresh = Counter(_named_values(mf.make_entities(2000, random.Random(0), fresh=True)))
    assert max(pooled.values()) > 1 and len(pooled) < sum(pooled.values()) / 2
    assert max(fresh.values()) == 1 and sum(fresh.values()) == sum(pooled.values())


def test_with_fresh_values_no_named_probe_answer_occurs_in_the_training_text(tmp_path):
    mf = _module()
    mf.main(["--out", str(tmp_path), "--seed", "3", "--entities", "400", "--bank-only", "20", "--fresh-values"])
    train = "\n".join(json.loads(line)["text"] for line in (tmp_path / "train.jsonl").open())
    probe = [json.loads(line) for line in (tmp_path / "probe.jsonl").open()]
    named = [p for p in probe if p["attribute"] in NAMED]
    assert named and not [p["answer"] for p in named if p["answer"].strip() in train]


def test_the_same_seed_writes_the_same_bytes(tmp_path):
    mf = _module()
    for d in ("a", "b"):
        mf.main(["--out", str(tmp_path / d), "--seed", "1", "--entities", "200", "--bank-only", "10", "--gzip"])
    for name in ("bank.jsonl.gz", "train.jsonl.gz", "probe.jsonl", "edits.jsonl"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    with gzip.open(tmp_path / "a" / "bank.jsonl.gz", "rt") as f:
        assert sum(1 for _ in f) == 200
