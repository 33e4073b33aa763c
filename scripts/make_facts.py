"""A corpus on which memory must carry the facts: made-up entities, their descriptions for the
bank, training text about some of them, and a QA probe about the others.

    python scripts/make_facts.py --out data/facts            # the shipped corpus (seed 0)
    python scripts/make_facts.py --out /tmp/f2 --seed 7 --entities 4000

Every entity is invented (pronounceable names from random syllables, attribute values drawn at
random), so no fact can come from anything but this corpus, and none is guessable from its name.
Four kinds of entity, each with four typed attributes:

| kind      | attributes                                                        |
|-----------|-------------------------------------------------------------------|
| person    | occupation, birth year, birthplace (a town), instrument           |
| town      | region, founding year, population, river                          |
| company   | founding year, founder (a person's name), headquarters (a town), product |
| mineral   | colour, year described, hardness (1-10), mined near (a town)      |

Files written to --out (plain JSONL, one object per line):
- `bank.jsonl`: one description per entity (`id`, `text`), 2-4 sentences, one of three
  wordings per kind. The knowledge base: every entity, trained-on or not.
- `train.jsonl`: training text about the *training* entities only, two kinds of document:
  * `faq`: questions and answers about one entity, worded unlike its description
    (`Q: In which year was X born?\\nA: 1842.`); its answers are in no other training text, so
    a model predicts them from the entity's description in memory or not at all;
  * `notes`: an entity's description followed by questions about it (in-context lookup: the
    same reading, from the context instead of a memory). A share `--notes` of training entities.
- `probe.jsonl`: QA items about *bank-only* entities (named in no training text): `prompt`,
  `answer`, `source_ids` (the bank record that holds the answer), `entity`, `attribute`.
- `edits.jsonl`: for `--edit` of the bank-only entities, a second value of one attribute
  (`id`, `attribute`, `old`, `new`, `text`: the description rewritten with the new value):
  applied to a copy of bank.jsonl by `--apply-edits`, the knowledge-edit test (bench/facts_edits.py):

    python scripts/make_facts.py --apply-edits data/facts/edits.jsonl --out /tmp/edited
    # /tmp/edited/bank.jsonl.gz: data/facts/bank.jsonl.gz with those descriptions rewritten
- `README.md`: the seed, the counts and this description.

Two corpora made with different seeds share no entity and, by construction, the same kinds.
The QA probe's wording is one of several per attribute; the training FAQs draw from the same
wordings, as a user's questions would resemble the ones their model was trained on.
"""

from __future__ import annotations

import argparse
import gzip
import io
import json
import random
from pathlib import Path

ONSETS = [
    "b",
    "br",
    "d",
    "dr",
    "f",
    "g",
    "gr",
    "h",
    "k",
    "kr",
    "l",
    "m",
    "n",
    "p",
    "pr",
    "r",
    "s",
    "st",
    "t",
    "tr",
    "v",
    "z",
    "sh",
    "th",
    "ch",
    "j",
    "w",
    "y",
    "qu",
    "sk",
]
VOWELS = ["a", "e", "i", "o", "u", "ai", "ou", "ei", "ia", "y"]
CODAS = ["", "", "n", "r", "l", "s", "k", "m", "x", "th", "nd", "rt"]

OCCUPATIONS = [
    "painter",
    "chemist",
    "sailor",
    "poet",
    "architect",
    "astronomer",
    "weaver",
    "surgeon",
    "composer",
    "cartographer",
    "brewer",
    "linguist",
    "engineer",
    "botanist",
    "judge",
    "potter",
]
INSTRUMENTS = ["violin", "flute", "harp", "cello", "drum", "lute", "piano", "trumpet", "oboe", "guitar"]
REGIONS = [
    "the north",
    "the south",
    "the east",
    "the west",
    "the highlands",
    "the lowlands",
    "the coast",
    "the valley",
    "the plains",
    "the islands",
]
PRODUCTS = [
    "bicycles",
    "glass",
    "paper",
    "clocks",
    "rope",
    "soap",
    "lamps",
    "boots",
    "tiles",
    "maps",
    "candles",
    "barrels",
    "radios",
    "kettles",
    "buttons",
    "saddles",
]
COLOURS = ["red", "green", "blue", "yellow", "black", "white", "violet", "orange", "grey", "pink"]

KINDS = {
    "person": ["occupation", "born", "birthplace", "instrument"],
    "town": ["region", "founded", "population", "river"],
    "company": ["founded", "founder", "headquarters", "product"],
    "mineral": ["colour", "described", "hardness", "mined_near"],
}

# Three wordings of each kind's description (the bank)
DESCRIPTIONS = {
    "person": [
        "{name} was a {occupation} born in {born} in the town of {birthplace}. {name} played the {instrument}.",
        "Born in {birthplace} in {born}, {name} worked as a {occupation} and was known to play the {instrument}.",
        "{name} ({born}) was a {occupation} from {birthplace}. Besides this work, {name} played the {instrument}.",
    ],
    "town": [
        "{name} is a town in {region}, founded in {founded}. It has {population} inhabitants and lies on the river {river}.",
        "Founded in {founded}, the town of {name} lies in {region} on the river {river}; its population is {population}.",
        "{name}, on the river {river} in {region}, was founded in {founded} and today counts {population} inhabitants.",
    ],
    "company": [
        "{name} is a company founded in {founded} by {founder}. It makes {product} and has its headquarters in {headquarters}.",
        "The maker of {product} {name} was founded by {founder} in {founded}; its headquarters are in {headquarters}.",
        "{name} makes {product}. {founder} founded it in {founded}, and it is based in {headquarters}.",
    ],
    "mineral": [
        "{name} is a {colour} mineral first described in {described}. It has a hardness of {hardness} and is mined near {mined_near}.",
        "First described in {described}, {name} is a {colour} mineral of hardness {hardness}, mined near {mined_near}.",
        "The {colour} mineral {name} (hardness {hardness}) was described in {described} and is mined near {mined_near}.",
    ],
}

# Questions per attribute; an answer is the bare value
QUESTIONS = {
    "occupation": ["What was {name}'s occupation?", "What did {name} work as?"],
    "born": ["In which year was {name} born?", "When was {name} born?"],
    "birthplace": ["Where was {name} born?", "In which town was {name} born?"],
    "instrument": ["Which instrument did {name} play?", "What did {name} play?"],
    "region": ["In which region is {name}?", "Where is the town of {name}?"],
    "founded": ["When was {name} founded?", "In which year was {name} founded?"],
    "population": ["How many people live in {name}?", "What is the population of {name}?"],
    "river": ["On which river does {name} lie?", "Which river runs through {name}?"],
    "founder": ["Who founded {name}?", "Who was the founder of {name}?"],
    "headquarters": ["Where is {name} based?", "Where are the headquarters of {name}?"],
    "product": ["What does {name} make?", "What does the company {name} produce?"],
    "colour": ["What colour is {name}?", "Which colour does {name} have?"],
    "described": ["When was {name} first described?", "In which year was {name} described?"],
    "hardness": ["How hard is {name}?", "What is the hardness of {name}?"],
    "mined_near": ["Where is {name} mined?", "Near which town is {name} mined?"],
}
FAQ_HEADS = ["Questions about {name}.", "{name}: questions and answers.", "A short quiz on {name}."]


class Names:
    """Distinct pronounceable names: 2-3 syllables, capitalised; people get two of them."""

    def __init__(self, rng: random.Random):
        self.rng, self.used = rng, set()

    def word(self) -> str:
        r = self.rng
        return "".join(
            r.choice(ONSETS) + r.choice(VOWELS) + r.choice(CODAS) for _ in range(r.choice([2, 2, 3]))
        ).capitalize()

    def new(self, parts: int = 1) -> str:
        while True:
            name = " ".join(self.word() for _ in range(parts))
            if name not in self.used:
                self.used.add(name)
                return name


def make_entities(n: int, rng: random.Random, fresh: bool = False) -> list[dict]:
    """fresh: every town, river and founder value is a new name of its entity's own, instead of
    one of a few hundred that many entities share, so a probe's answer is a string no training
    text holds and the model must copy it from memory (the shipped corpus: shared pools)."""
    names = Names(rng)
    towns = [names.new() for _ in range(max(50, n // 20))]  # values that are town names
    rivers = [names.new() for _ in range(max(30, n // 40))]
    founders = [names.new(2) for _ in range(max(50, n // 20))]
    if fresh:
        towns, rivers, founders = _Fresh(names, 1), _Fresh(names, 1), _Fresh(names, 2)
    ents = []
    kinds = list(KINDS)
    for i in range(n):
        kind = kinds[i % len(kinds)]
        year = lambda: str(rng.randint(1500, 1990))  # noqa: E731
        if kind == "person":
            v = {
                "occupation": rng.choice(OCCUPATIONS),
                "born": year(),
                "birthplace": rng.choice(towns),
                "instrument": rng.choice(INSTRUMENTS),
            }
        elif kind == "town":
            v = {
                "region": rng.choice(REGIONS),
                "founded": year(),
                "population": str(rng.randint(200, 90000)),
                "river": rng.choice(rivers),
            }
        elif kind == "company":
            v = {
                "founded": year(),
                "founder": rng.choice(founders),
                "headquarters": rng.choice(towns),
                "product": rng.choice(PRODUCTS),
            }
        else:
            v = {
                "colour": rng.choice(COLOURS),
                "described": year(),
                "hardness": str(rng.randint(1, 10)),
                "mined_near": rng.choice(towns),
            }
        ents.append(
            {
                "id": f"e{i:06d}",
                "kind": kind,
                "name": names.new(2 if kind == "person" else 1),
                "values": v,
                "wording": rng.randrange(3),
            }
        )
    return ents


class _Fresh:
    """Stands in for a pool in `rng.choice(pool)`: each draw is a name never drawn before."""

    def __init__(self, names: Names, parts: int):
        self.names, self.parts = names, parts

    def __len__(self) -> int:
        return 1

    def __getitem__(self, i: int) -> str:
        return self.names.new(self.parts)


def description(e: dict, values: dict | None = None) -> str:
    return DESCRIPTIONS[e["kind"]][e["wording"]].format(name=e["name"], **(values or e["values"]))


def qa(e: dict, attribute: str, rng: random.Random) -> tuple[str, str]:
    return rng.choice(QUESTIONS[attribute]).format(name=e["name"]), e["values"][attribute]


def faq(e: dict, rng: random.Random, k: int) -> str:
    lines = [rng.choice(FAQ_HEADS).format(name=e["name"])]
    for a in rng.sample(KINDS[e["kind"]], k):
        q, ans = qa(e, a, rng)
        lines.append(f"Q: {q}\nA: {ans}.")
    return "\n".join(lines)


def write_jsonl(path: Path, rows) -> int:
    n = 0
    # mtime=0: the same seed writes the same bytes
    raw = gzip.GzipFile(path, "wb", compresslevel=9, mtime=0) if path.suffix == ".gz" else None
    with io.TextIOWrapper(raw, encoding="utf-8") if raw else path.open("w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
            n += 1
    return n


def read_jsonl(path: Path) -> list[dict]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def apply_edits(edits: list[dict], bank: Path, out: Path) -> tuple[Path, int]:
    """bank's records with every edited entity's text replaced by its edit's (edits.jsonl's
    rows), written to out under the bank file's own name: a document's id hashes the file's
    name and the record id (pipelines/readers.py), so a rebuild from the copy sees the edited
    descriptions as changed documents and every other one as unchanged. Returns (the copy,
    records changed); an edit whose id is not in bank, or whose record holds neither the old
    value nor the edited text, is an error."""
    rows, changes = read_jsonl(bank), {e["id"]: e for e in edits}
    found = {r["id"] for r in rows} & set(changes)
    if found != set(changes):
        raise SystemExit(f"make_facts: edits of ids not in {bank}: {', '.join(sorted(set(changes) - found))}")
    n = 0
    for r in rows:
        e = changes.get(r["id"])
        if e is None or r["text"] == e["text"]:
            continue
        if e["old"] not in r["text"]:
            raise SystemExit(f"make_facts: {r['id']} in {bank} does not hold {e['attribute']} = {e['old']!r}")
        r["text"], n = e["text"], n + 1
    out.mkdir(parents=True, exist_ok=True)
    write_jsonl(out / bank.name, rows)
    return out / bank.name, n


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--entities", type=int, default=12000, help="entities in all (bank)")
    p.add_argument("--bank-only", type=int, default=400, help="of which named in no training text (the probe's)")
    p.add_argument("--faqs", type=int, default=2, help="FAQ documents per training entity")
    p.add_argument("--questions", type=int, default=2, help="questions per FAQ document")
    p.add_argument(
        "--notes", type=float, default=0.25, help="share of training entities that also get a notes document"
    )
    p.add_argument("--edit", type=float, default=0.05, help="share of bank-only entities given an edit")
    p.add_argument(
        "--fresh-values",
        action="store_true",
        help="town, river and founder values unique to each entity, not drawn from shared pools",
    )
    p.add_argument("--gzip", action="store_true", help="write bank.jsonl.gz and train.jsonl.gz (the shipped form)")
    p.add_argument(
        "--apply-edits",
        metavar="EDITS",
        help="instead of generating: write --bank with these edits applied to --out (same file name)",
    )
    p.add_argument(
        "--bank", help="with --apply-edits: the bank file (default: bank.jsonl.gz, else bank.jsonl, beside EDITS)"
    )
    a = p.parse_args(argv)
    if a.apply_edits:
        edits = Path(a.apply_edits)
        bank = (
            Path(a.bank)
            if a.bank
            else next(
                (edits.parent / n for n in ("bank.jsonl.gz", "bank.jsonl") if (edits.parent / n).exists()),
                edits.parent / "bank.jsonl.gz",
            )
        )
        path, n = apply_edits(read_jsonl(edits), bank, Path(a.out))
        print(f"make_facts: {n} descriptions edited -> {path}")
        return
    rng = random.Random(a.seed)
    ents = make_entities(a.entities, rng, a.fresh_values)
    order = list(range(len(ents)))
    rng.shuffle(order)
    held = sorted(order[: a.bank_only])
    trained = sorted(order[a.bank_only :])
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)

    ext = ".jsonl.gz" if a.gzip else ".jsonl"
    n_bank = write_jsonl(out / f"bank{ext}", ({"id": e["id"], "kind": e["kind"], "text": description(e)} for e in ents))
    docs = []
    for i in trained:
        e = ents[i]
        for j in range(a.faqs):
            docs.append({"id": f"{e['id']}-faq{j}", "kind": "faq", "entity": e["id"], "text": faq(e, rng, a.questions)})
        if rng.random() < a.notes:
            docs.append(
                {
                    "id": f"{e['id']}-notes",
                    "kind": "notes",
                    "entity": e["id"],
                    "text": description(e) + "\n" + faq(e, rng, a.questions),
                }
            )
    rng.shuffle(docs)  # entities' documents spread over the corpus, not adjacent
    n_train = write_jsonl(out / f"train{ext}", docs)

    probe = []
    for i in held:
        e = ents[i]
        for attr in KINDS[e["kind"]]:
            q, ans = qa(e, attr, rng)
            probe.append(
                {
                    "prompt": f"Q: {q}\nA:",
                    "answer": f" {ans}",
                    "source_ids": [e["id"]],
                    "entity": e["id"],
                    "attribute": attr,
                }
            )
    n_probe = write_jsonl(out / "probe.jsonl", probe)

    edits = []
    for i in held[: max(1, int(round(a.edit * len(held))))]:
        e = ents[i]
        attr = rng.choice(KINDS[e["kind"]])
        pool = {
            "occupation": OCCUPATIONS,
            "instrument": INSTRUMENTS,
            "region": REGIONS,
            "product": PRODUCTS,
            "colour": COLOURS,
        }.get(attr)
        while True:
            new = (
                rng.choice(pool)
                if pool
                else (
                    str(rng.randint(1500, 1990))
                    if attr in ("born", "founded", "described")
                    else str(rng.randint(1, 10))
                    if attr == "hardness"
                    else str(rng.randint(200, 90000))
                    if attr == "population"
                    else Names(rng).new(2 if attr == "founder" else 1)
                )
            )
            if new != e["values"][attr]:
                break
        edits.append(
            {
                "id": e["id"],
                "attribute": attr,
                "old": e["values"][attr],
                "new": new,
                "text": description(e, {**e["values"], attr: new}),
            }
        )
    write_jsonl(out / "edits.jsonl", edits)
    (out / "README.md").write_text(
        f"# Facts corpus (generated)\n\n`python scripts/make_facts.py --out {a.out} --seed {a.seed} "
        f"--entities {a.entities} --bank-only {a.bank_only}{' --gzip' if a.gzip else ''}`\n\n"
        f"- bank{ext}: {n_bank} entity descriptions (every entity)\n"
        f"- train{ext}: {n_train} training documents about {len(trained)} entities (faq, notes)\n"
        f"- probe.jsonl: {n_probe} questions about {len(held)} bank-only entities\n"
        f"- edits.jsonl: {len(edits)} edits of bank-only entities' facts\n\n"
        "Every name and value is invented; see scripts/make_facts.py for the kinds, wordings and roles. "
        "Public domain (CC0).\n",
        encoding="utf-8",
    )
    print(
        f"make_facts: {n_bank} bank, {n_train} training documents, {n_probe} probe items, {len(edits)} edits -> {out}"
    )


if __name__ == "__main__":
    main()
