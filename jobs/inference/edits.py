"""Knowledge edits, measured: what a change to the bank's source does to the greedy answers of QA
probe items and to the memories those answers read (issue 24, part 5; bench/facts_edits.py).

An edit is a rebuild, not a training run: change a document, `m3 rebuild` (only its references
are re-encoded and re-embedded), and the live build serves the new memory; `--build -1` serves
the build before it, with the model its memories were written by (jobs/models.py). The same
items are read three times: on the live build before the edit (the same-run baseline), on the
live build after it, and on the build before that, pinned. Two kinds of evidence:

- answers (`flip_rates`): greedy continuations, `m3 generate`'s path at temperature 0, against
  the old and the new answer and against the baseline's continuation;
- memories (`memory_rates`): the text of the references each answer read, in the build it read
  them from, and of the item's source document in that build: whether the edited item's memory
  holds the new value. This shows the mechanism whether or not the model reads its memories
  (a model that does not read has no reason to change its answers).

An item is a probe (jobs/inference/qa_probes.py) and, when its fact was edited, the new answer.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from jobs.inference.qa_probes import Probe, source_refs, tokenize


@dataclass(frozen=True)
class Item:
    probe: Probe
    new: str | None = None  # the edited answer (with the probe answer's leading space), None: not edited

    @property
    def edited(self) -> bool:
        return self.new is not None


@dataclass
class Reading:
    """One item on one build."""

    tokens: list[int]  # the greedy continuation
    text: str
    read: list[str]  # the references the answer's first token read
    texts: dict[str, str]  # their text in that build
    source: dict[str, str] = field(default_factory=dict)  # the item's source references in that build


def edit_items(probe_path: str, edits: list[dict]) -> tuple[list[Item], list[Item]]:
    """The items of a probe file about edited records, and the others. edits: rows of an
    edits.jsonl (scripts/make_facts.py: `id` the record, `attribute`, `old`, `new`); an item
    whose source_ids name an edited record is edited when its line's `attribute` is the edit's
    (where the line says; else when its answer is the old value); the record's other items
    come with it, unedited (their answers must not move)."""
    import json
    from pathlib import Path

    from jobs.inference.qa_probes import read_probes

    lines = Path(probe_path).read_text(encoding="utf-8").splitlines()
    by_id = {e["id"]: e for e in edits}
    about, rest = [], []
    for p in read_probes(probe_path):
        e = next((by_id[s] for s in p.source_ids if s in by_id), None)
        if e is None:
            rest.append(Item(p))
            continue
        attr = json.loads(lines[p.line - 1]).get("attribute")
        hit = attr == e["attribute"] if attr is not None else p.answer.strip() == e["old"]
        about.append(Item(p, f" {e['new']}" if hit else None))
    return about, rest


def answer_tokens(tokenizer, eos_id: int, item: Item) -> tuple[list[int], list[int]]:
    """The item's old and new answer tokens as they follow its prompt (the new = the old when
    not edited)."""
    old = tokenize(tokenizer, eos_id, item.probe)[1]
    if not item.edited:
        return old, old
    return old, tokenize(tokenizer, eos_id, Probe(item.probe.prompt, item.new, (), 0))[1]


def read_answers(inf, items: list[Item]) -> list[Reading]:
    """Each item's greedy continuation on `inf`'s build (live or pinned), as long as the longer
    of its old and new answers (the longest over the items: one length for every batch), and
    what its answer read: the references of the chunk holding the answer's first token."""
    tok, eos = inf.tokenizer, inf.model.config.eos_id
    prompts = [tokenize(tok, eos, it.probe)[0] for it in items]
    n_new = max(max(len(a) for a in answer_tokens(tok, eos, it)) for it in items)
    outs = inf.generate_tokens(prompts, "memory", max_new_tokens=n_new, temperature=0.0, stop_at_eos=False)
    reads = []
    for p, out in zip(prompts, outs):
        chunk = next((c for c in out.reads if c.start <= len(p) < c.end), None)
        reads.append(list(chunk.ref_ids) if chunk else [])
    texts = inf.ref_texts({r for row in reads for r in row})
    sources = source_refs(inf.bank, {s for it in items for s in it.probe.source_ids})
    return [
        Reading(
            out.tokens,
            out.text,
            row,
            {r: texts.get(r, "") for r in row},
            {r: x for s in it.probe.source_ids for r, x in sources.get(s, [])},
        )
        for it, out, row in zip(items, outs, reads)
    ]


def holds(text: str, value: str) -> bool:
    """Whether text states value as a whole word or phrase ("17" is not in "1723")."""
    value = value.strip()
    return bool(value) and re.search(rf"(?<!\w){re.escape(value)}(?!\w)", text) is not None


def _rate(hits: list[bool]) -> dict:
    n = len(hits)
    return {"count": sum(hits), "n": n, "share": round(sum(hits) / n, 4) if n else None}


def flip_rates(
    answers: list[tuple[list[int], list[int]]],
    before: list[list[int]],
    after: list[list[int]],
    pinned: list[list[int]],
    edited: list[bool],
    seen: list[tuple[bool, bool]] | None = None,
) -> dict:
    """The issue's three rates, on token lists. answers[i] = (old, new) answer tokens (equal
    when item i is not edited); before/after/pinned[i] = its greedy continuation on the live
    build before the edit, after it, and on the build before live, pinned. An item's answer is
    its continuation's first max(len(old), len(new)) tokens.

    - edited, follows the new fact after the edit (and, the baseline, before it: chance);
    - edited, gave the old answer before the edit (exact match of the baseline), and of those,
      the share that follow the new fact after it (the flip rate against the baseline);
    - not edited, answer unchanged after the edit;
    - every item, the pinned old build answers as the baseline did (and the edited ones alone).

    seen[i] = (the old answer, the new answer) occurs in the training text (`seen_in`): with it,
    the baseline's exact match and the edited items' follow-new rate split by whether the value
    the model must copy is one it was ever trained to write."""

    def cut(seq, i):
        return list(seq[i][: max(len(a) for a in answers[i])])

    def starts(seq, i, ans):
        return list(seq[i][: len(ans)]) == list(ans)

    ed = [i for i, e in enumerate(edited) if e]
    other = [i for i, e in enumerate(edited) if not e]
    return {
        "edited_follow_new": _rate([starts(after, i, answers[i][1]) for i in ed]),
        "edited_follow_new_before": _rate([starts(before, i, answers[i][1]) for i in ed]),
        "edited_old_before": _rate([starts(before, i, answers[i][0]) for i in ed]),
        "edited_old_pinned": _rate([starts(pinned, i, answers[i][0]) for i in ed]),
        # the flip rate against the baseline: of the edited facts the model knew before the edit
        # (a model that does not answer from memory has none to flip)
        "edited_known_flipped": _rate(
            [starts(after, i, answers[i][1]) for i in ed if starts(before, i, answers[i][0])]
        ),
        "others_unchanged": _rate([cut(after, i) == cut(before, i) for i in other]),
        "pinned_as_before": _rate([cut(pinned, i) == cut(before, i) for i in range(len(edited))]),
        "edited_pinned_as_before": _rate([cut(pinned, i) == cut(before, i) for i in ed]),
        **(
            {}
            if seen is None
            else {
                "edited_follow_new_seen": _rate([starts(after, i, answers[i][1]) for i in ed if seen[i][1]]),
                "edited_follow_new_unseen": _rate([starts(after, i, answers[i][1]) for i in ed if not seen[i][1]]),
                "baseline_exact_seen": _rate(
                    [starts(before, i, answers[i][0]) for i in range(len(edited)) if seen[i][0]]
                ),
                "baseline_exact_unseen": _rate(
                    [starts(before, i, answers[i][0]) for i in range(len(edited)) if not seen[i][0]]
                ),
            }
        ),
    }


def seen_in(text: str, values: list[str]) -> list[bool]:
    """Whether each value occurs, as a whole word or phrase, in text (the training-role corpus):
    a value no training text holds is one the model never learned to write, only to copy."""
    return [holds(text, v) for v in values]


def memory_rates(items: list[Item], before: list[Reading], after: list[Reading], pinned: list[Reading]) -> dict:
    """The same questions asked of the memories. For edited items, per pass: the answer read a
    reference of its source document; that reference, as read, holds the new (the old) value;
    the source's own references in that build hold the new value (the bank's side alone:
    retrieval aside). For every item: what it read on the pinned build (ids and text) is what
    it read before the edit; for the others, it read the same references after the edit
    (retrieval unmoved; their text moves where one is an edited description)."""

    def read_source(r: Reading) -> list[str]:
        return [x for x in r.read if x in r.source]

    def read_holds(r: Reading, value: str) -> bool:
        return any(holds(r.texts[x], value) for x in read_source(r))

    ed = [i for i, it in enumerate(items) if it.edited]
    other = [i for i, it in enumerate(items) if not it.edited]
    out = {}
    for name, run in (("before", before), ("after", after), ("pinned", pinned)):
        out[f"read_source_{name}"] = _rate([bool(read_source(run[i])) for i in ed])
        out[f"read_new_{name}"] = _rate([read_holds(run[i], items[i].new) for i in ed])
        out[f"read_old_{name}"] = _rate([read_holds(run[i], items[i].probe.answer) for i in ed])
        out[f"source_new_{name}"] = _rate([any(holds(x, items[i].new) for x in run[i].source.values()) for i in ed])
    out["pinned_reads_as_before"] = _rate([pinned[i].texts == before[i].texts for i in range(len(items))])
    # by id: an item about an edited entity that reads its description reads the new text, as it should
    out["others_read_same_refs"] = _rate([after[i].read == before[i].read for i in other])
    # the same for items about records no edit touched: a retrieval moved by the edit of another
    # record (a ranking's statistics, an index retrained) shows here
    touched = {s for i in ed for s in items[i].probe.source_ids}
    untouched = [i for i in other if not touched & set(items[i].probe.source_ids)]
    out["untouched_read_same_refs"] = _rate([after[i].read == before[i].read for i in untouched])
    out["untouched_read_same_best"] = _rate([after[i].read[:1] == before[i].read[:1] for i in untouched])
    return out


ANSWER_ROWS = [  # (key, what it says, the goal)
    ("edited_follow_new", "edited items: the answer after the edit is the new fact", ">= 80 %"),
    ("edited_follow_new_before", "  the same before the edit (baseline: chance)", ""),
    ("edited_old_before", "edited items: the old fact before the edit (baseline exact match)", ""),
    ("edited_known_flipped", "  of those, the new fact after the edit (flip rate against the baseline)", ""),
    ("others_unchanged", "other items: the answer after the edit is the baseline's", ">= 95 %"),
    ("pinned_as_before", "every item: the pinned old build answers as the baseline did", ">= 95 %"),
    ("edited_pinned_as_before", "  edited items alone", ""),
    ("edited_follow_new_seen", "edited items whose new value occurs in the training text: follow it", ""),
    ("edited_follow_new_unseen", "edited items whose new value occurs in no training text: follow it", ""),
    ("baseline_exact_seen", "every item, before the edit, answer in the training text: exact match", ""),
    ("baseline_exact_unseen", "every item, before the edit, answer in no training text: exact match", ""),
]
MEMORY_ROWS = [
    ("source_new", "edited items: their source's reference in the build holds the new value"),
    ("read_source", "edited items: the answer read its source's reference"),
    ("read_new", "  ... and that reference, as read, holds the new value"),
    ("read_old", "  ... holds the old value"),
]


def render(answers: dict, memories: dict) -> str:
    """The two tables bench/facts_edits.py prints (markdown)."""

    def cell(r: dict) -> str:
        return f"{r['share']:.1%} ({r['count']}/{r['n']})" if r["n"] else "n/a"

    lines = ["| answers (greedy) | rate | goal |", "|---|---|---|"]
    lines += [f"| {what} | {cell(answers[key])} | {goal} |" for key, what, goal in ANSWER_ROWS if key in answers]
    lines += [
        "",
        "| memories read | before the edit | after (live) | pinned old build (--build -1) |",
        "|---|---|---|---|",
    ]
    lines += [
        f"| {what} | " + " | ".join(cell(memories[f"{key}_{p}"]) for p in ("before", "after", "pinned")) + " |"
        for key, what in MEMORY_ROWS
    ]
    lines += [
        f"| every item: the pinned build's memories read are the baseline's | | | "
        f"{cell(memories['pinned_reads_as_before'])} |",
        f"| other items: the references read after the edit are the baseline's | | "
        f"{cell(memories['others_read_same_refs'])} | |",
        f"|   items about records no edit touched | | {cell(memories['untouched_read_same_refs'])} | |",
        f"|   ... their best (first) reference | | {cell(memories['untouched_read_same_best'])} | |",
    ]
    return "\n".join(lines)
