"""Edit knowledge and roll it back without retraining (issue 24, part 5): the flip rate.

    nice -n 10 .venv/bin/python bench/facts_edits.py -c configs/facts.yaml --set bank.uri=/tmp/editbank

On a trained facts bank (`m3 run -c configs/facts.yaml`; the bench edits it: run it on a copy):

1. baseline: greedy answers (`m3 generate`'s path, temperature 0) to the QA probe's items about
   the entities edits.jsonl changes (every attribute of each) and to a seeded sample of the
   other items, on the live build;
2. the edits applied to a copy of the bank-role corpus file that holds them
   (scripts/make_facts.py `apply_edits`, the file's own name kept so document ids do not move),
   corpus.paths pointed at the copy, `m3 rebuild` (incremental: only the edited descriptions
   are re-encoded and re-embedded);
3. the same items on the new live build, then on the build before it, pinned (`--build -1`).

Prints (markdown) and returns the answer rates of jobs/inference/edits.py `flip_rates` and the
memory rates of `memory_rates` (does the edited item's memory hold the new value?), each against
the same run's baseline. The edited-items and others' rates need a model that reads its
memories; the memory rates show the mechanism with any model. --dry-run stops after the
baseline. The edited corpus goes to --work (default: beside the bank, `<bank>-edited-corpus`).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import random
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the project's model/, not bench/model.py


def make_facts():
    spec = importlib.util.spec_from_file_location("make_facts", ROOT / "scripts" / "make_facts.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def select_items(probe_path: str, edits: list[dict], others: int, seed: int) -> list:
    """Every probe item about an edited entity (the edited attribute's carries the new answer)
    and `others` items drawn (seeded) from the rest."""
    from jobs.inference.edits import edit_items

    about, rest = edit_items(probe_path, edits)
    if sum(it.edited for it in about) < len(edits):
        raise SystemExit(
            f"facts_edits: {probe_path} asks about {sum(it.edited for it in about)} of the {len(edits)} edited facts"
        )
    return about + random.Random(seed).sample(rest, min(others, len(rest)))


def edited_corpus(cfg, edits: list[dict], work: Path) -> list[str]:
    """--set overrides that point corpus.paths (and roles) at copies of the files holding the
    edited records, with the edits applied."""
    mf = make_facts()
    paths, roles, left, done = list(cfg.corpus.paths), dict(cfg.corpus.roles), {e["id"] for e in edits}, 0
    for i, path in enumerate(paths):
        if cfg.corpus.role_of(path) == "training" or not Path(path).is_file():
            continue
        ids = {r.get(cfg.corpus.id_key) for r in mf.read_jsonl(Path(path))}
        mine = [e for e in edits if e["id"] in ids]
        if not mine:
            continue
        copy, n = mf.apply_edits(mine, Path(path), work / f"{i}")
        done += n
        left -= {e["id"] for e in mine}
        paths[i] = str(copy)
        if path in roles:
            roles[str(copy)] = roles.pop(path)
    if left:
        raise SystemExit(f"facts_edits: no bank file of corpus.paths holds {', '.join(sorted(left))}")
    print(f"[facts_edits] {done} records edited in copies under {work}", flush=True)
    return [
        f"corpus.paths=[{', '.join(paths)}]",
        "corpus.roles={" + ", ".join(f"{k}: {v}" for k, v in roles.items()) + "}",
    ]


def training_text(cfg) -> str:
    """The text of the corpus files the model trains on (role training or both), one string."""
    mf = make_facts()
    return "\n".join(
        str(r.get(cfg.corpus.text_key, ""))
        for path in cfg.corpus.paths
        if cfg.corpus.role_of(path) != "bank" and Path(path).is_file()
        for r in mf.read_jsonl(Path(path))
    )


def run(
    config: str,
    overrides: list[str],
    edits_path: str | None = None,
    others: int = 100,
    seed: int = 0,
    work: str | None = None,
    dry_run: bool = False,
) -> dict:
    from jobs.config import load_config
    from jobs.inference.edits import answer_tokens, flip_rates, holds, memory_rates, read_answers, render, seen_in
    from jobs.inference.engine import Inference
    from jobs.ops.rebuild import run_rebuild
    from storage.bank import Bank
    from storage.builds import resolve_build

    t0 = time.time()
    cfg = load_config(config, overrides)
    probe_path = cfg.infer.eval.probes[0]
    edits_path = edits_path or str(Path(probe_path).with_name("edits.jsonl"))
    edits = make_facts().read_jsonl(Path(edits_path))
    items = select_items(probe_path, edits, others, seed)
    n_edited = sum(it.edited for it in items)
    ids = {e["id"] for e in edits}
    siblings = sum(not it.edited and bool(ids & set(it.probe.source_ids)) for it in items)
    print(
        f"[facts_edits] {len(items)} items: {n_edited} edited facts, {len(items) - n_edited} others "
        f"({siblings} of them the edited entities' other attributes)",
        flush=True,
    )

    inf = Inference(cfg)
    built_on = resolve_build(Bank.of(cfg), "live")
    before = read_answers(inf, items)
    stale = [
        it.probe.line
        for it, r in zip(items, before)
        if it.edited
        and any(holds(x, it.new) for x in r.source.values())
        and not any(holds(x, it.probe.answer) for x in r.source.values())
    ]
    if stale:  # a second run on the same bank would compare the edited build with itself
        raise SystemExit(
            f"facts_edits: the live build already holds the edits (probe lines {stale[:5]}): "
            f"run on a fresh copy of the trained bank"
        )
    timings = {"baseline": round(time.time() - t0, 1)}
    if dry_run:
        return {"items": len(items), "before": [r.text for r in before]}

    bank = Path(cfg.bank.uri.removeprefix("file://"))
    work_dir = Path(work) if work else bank.with_name(bank.name + "-edited-corpus")
    cfg2 = load_config(config, [*overrides, *edited_corpus(cfg, edits, work_dir)])
    t = time.time()
    rebuild = run_rebuild(cfg2)
    timings["rebuild"] = round(time.time() - t, 1)
    t = time.time()
    live = Inference(cfg2)
    after = read_answers(live, items)
    pinned_inf = Inference(cfg2, build=-1)
    pinned = read_answers(pinned_inf, items)
    timings["after_and_pinned"] = round(time.time() - t, 1)

    tok, eos = inf.tokenizer, inf.model.config.eos_id
    answers = [answer_tokens(tok, eos, it) for it in items]
    train_text = training_text(cfg)
    seen = list(
        zip(
            seen_in(train_text, [it.probe.answer for it in items]),
            seen_in(train_text, [it.new or it.probe.answer for it in items]),
        )
    )
    rates = flip_rates(
        answers,
        [r.tokens for r in before],
        [r.tokens for r in after],
        [r.tokens for r in pinned],
        [it.edited for it in items],
        seen,
    )
    memories = memory_rates(items, before, after, pinned)
    out = {
        "bank": cfg.bank.uri,
        "items": len(items),
        "edited": n_edited,
        "edits": len(edits),
        "builds": {
            "before": built_on.get("build"),
            "after": resolve_build(Bank.of(cfg), "live")["build"],
            "pinned": pinned_inf.build["build"],
        },
        "model": {
            "live": live.model_hash[:12],
            "pinned": pinned_inf.model_hash[:12],
            "reads_memory": bool(inf.memory_reading.get("reads_memory")),
        },
        "rebuild": {k: rebuild[k] for k in ("status", "added", "changed", "removed", "seconds")},
        "answers": rates,
        "memories": memories,
        "seconds": timings,
        "examples": [
            {
                "prompt": it.probe.prompt,
                "old": it.probe.answer,
                "new": it.new,
                "before": b.text,
                "after": a.text,
                "pinned": p.text,
            }
            for it, b, a, p in zip(items, before, after, pinned)
            if it.edited
        ][:5],
    }
    m = out["model"]
    models = f"model {m['live']} on both builds" if m["live"] == m["pinned"] else f"models {m['live']} / {m['pinned']}"
    print(
        f"facts edits on {cfg.bank.uri}: {len(edits)} entities edited, {n_edited} edited facts and "
        f"{len(items) - n_edited} other items asked; rebuild {rebuild['status']} in {rebuild['seconds']:.0f} s "
        f"(references changed {rebuild['changed']}, added {rebuild['added']}, removed {rebuild['removed']}); "
        f"build {out['builds']['before']} -> {out['builds']['after']}, pinned {out['builds']['pinned']}; {models}"
        f"{'' if m['reads_memory'] else ' (trained without memory)'}"
    )
    print(render(rates, memories))
    for ex in out["examples"]:
        print(
            f"  {ex['prompt']!r}: old {ex['old']!r} new {ex['new']!r} | before {ex['before']!r} after "
            f"{ex['after']!r} pinned {ex['pinned']!r}"
        )
    return out


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("-c", "--config", required=True)
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--edits", help="edits.jsonl (default: beside the config's first probe file)")
    p.add_argument("--others", type=int, default=100, help="items about unedited entities, drawn at random")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--work", help="where the edited corpus copy goes (default: <bank>-edited-corpus)")
    p.add_argument("--dry-run", action="store_true", help="the baseline only: the bank is not changed")
    p.add_argument(
        "--threads",
        type=int,
        help="torch threads (default torch's: one per core; on cores shared "
        "with other work 1 was 4-7x faster per matmul)",
    )
    p.add_argument("--json", help="also write the results here")
    a = p.parse_args(argv)
    if a.threads:
        import torch

        torch.set_num_threads(a.threads)
    out = run(a.config, a.overrides, a.edits, a.others, a.seed, a.work, a.dry_run)
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=2))
    return out


if __name__ == "__main__":
    main()
