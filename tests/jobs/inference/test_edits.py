"""Editing knowledge and rolling it back without retraining (jobs/inference/edits.py): a fact
edited in the bank's source reaches, after an incremental `m3 rebuild`, the reference a QA probe
item reads (its text, its tokens, its memory), and the build before it, pinned (`--build -1`),
still serves the old one, with the same model. Real facts-corpus slice, LanceDB, Ray stages and
retrieval (tests/conftest.py edited_facts_bank).

What this cannot show: the model's greedy answers following the edit. That needs a model that
reads its memories, which the tiny random-weight model here does not and which cannot be trained
in a test's time (configs/facts.yaml's run takes ~1 h on 2 cores and does not read yet either:
BENCHMARKS.md); bench/facts_edits.py measures it on a trained bank. The rate arithmetic the bench
reports is checked here on hand-made answers."""

from __future__ import annotations

import pytest
import torch

from jobs.inference.edits import Item, Reading, edit_items, flip_rates, holds, memory_rates, read_answers, seen_in
from jobs.inference.engine import Inference
from jobs.inference.qa_probes import Probe
from model.checkpoint import saved_hash
from tests.conftest import FACTS

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def edited(edited_facts_bank):
    """The edited items and what they read on the live build (2) and on build 1 pinned."""
    eb = edited_facts_bank
    about, _ = edit_items(str(FACTS / "probe.jsonl"), eb.edits)
    live, pinned = Inference(eb.cfg2), Inference(eb.cfg2, build=-1)
    return eb, about, live, pinned, read_answers(live, about), read_answers(pinned, about)


def test_the_rebuild_re_encodes_only_the_edited_descriptions(edited_facts_bank):
    first, second = edited_facts_bank.rebuilds
    n = len(edited_facts_bank.edits)
    assert first["status"] == second["status"] == "published"
    assert (second["changed"], second["added"], second["removed"]) == (n, 0, 0)
    assert second["memories"]["unchanged"] == first["added"] - n


def test_what_an_edited_item_reads_holds_the_new_value_live_and_the_old_one_pinned(edited):
    eb, about, live, pinned, now, then = edited
    assert live.build is None and pinned.build["build"] == 1 and not pinned.build["live"]
    items = [(it, a, b) for it, a, b in zip(about, now, then) if it.edited]
    assert len(items) == len(eb.edits)
    for it, a, b in items:
        old, new = it.probe.answer, it.new
        # the bank's side: the source's reference in each build
        assert a.source.keys() == b.source.keys() and a.source
        assert all(holds(x, new) and not holds(x, old) for x in a.source.values()), (it.probe, a.source)
        assert all(holds(x, old) and not holds(x, new) for x in b.source.values()), (it.probe, b.source)
    # the retrieval side: what the answer read, where it read its source (same ref_id, other text)
    read = [(it, a, b) for it, a, b in items if set(a.read) & a.source.keys() and set(b.read) & b.source.keys()]
    assert read, "no edited item's answer read its source on both builds"
    for it, a, b in read:
        ref = next(r for r in a.read if r in a.source)
        assert ref in b.read
        assert holds(a.texts[ref], it.new) and holds(b.texts[ref], it.probe.answer)
        # the tokens the memory is encoded from, in each build
        tok = live.tokenizer
        assert holds(tok.decode(live.retriever().ref_tokens([ref])[ref]), it.new)
        assert holds(tok.decode(pinned.retriever().ref_tokens([ref])[ref]), it.probe.answer)


def test_the_memory_served_is_the_edited_reference_s_encoding_and_the_old_one_pinned(edited):
    eb, about, live, pinned, now, then = edited
    it, a = next((it, a) for it, a in zip(about, now) if it.edited)
    ref = next(iter(a.source))
    new_mem, _ = live.store().fetch([ref])
    old_mem, _ = pinned.store().fetch([ref])
    assert not torch.equal(new_mem, old_mem)
    for inf, mem in ((live, new_mem), (pinned, old_mem)):
        with torch.no_grad():
            enc = inf.model.encode_references(torch.tensor([inf.retriever().ref_tokens([ref])[ref]]))
        assert torch.allclose(mem[0].float(), enc.kv[0].float(), atol=1e-5)


def test_a_pinned_build_is_served_by_the_model_its_memories_name(edited):
    eb, about, live, pinned, now, then = edited
    assert eb.cfg2.infer.checkpoint is None  # found through the memories' lineage, not named
    assert pinned.checkpoint == live.checkpoint == eb.ckpt
    assert pinned.model_hash == saved_hash(eb.ckpt)


def test_items_of_an_edited_record_other_than_the_edited_fact_are_not_edited(edited):
    eb, about, *_ = edited
    ids = {e["id"] for e in eb.edits}
    assert {s for it in about for s in it.probe.source_ids} == ids
    assert sum(it.edited for it in about) == len(ids) and len(about) > len(ids)
    by_id = {e["id"]: e for e in eb.edits}
    for it in about:
        e = by_id[it.probe.source_ids[0]]
        assert (it.new == f" {e['new']}") if it.edited else it.probe.answer.strip() != e["old"]


def test_holds_a_value_as_a_whole_word():
    assert holds("founded in 1723. It has", " 1723") and not holds("founded in 1723.", "172")
    assert holds("lies in the plains, on", "the plains") and not holds("x", " ")


def test_flip_rates_count_each_case():
    # item 0 and 3 edited (old -> new), 1 and 2 not
    answers = [([1, 2], [3, 4]), ([5], [5]), ([6, 7], [6, 7]), ([8], [9, 9])]
    before = [[1, 2, 0], [5, 0, 0], [6, 7, 0], [1, 1, 1]]
    after = [[3, 4, 0], [5, 1, 1], [6, 0, 0], [9, 9, 0]]
    pinned = [[1, 2, 0], [5, 0, 0], [0, 7, 0], [1, 1, 1]]
    r = flip_rates(answers, before, after, pinned, [True, False, False, True])
    got = {k: (v["count"], v["n"]) for k, v in r.items()}
    assert got == {
        "edited_follow_new": (2, 2),
        "edited_follow_new_before": (0, 2),
        "edited_old_before": (1, 2),
        "edited_old_pinned": (1, 2),
        "edited_known_flipped": (1, 1),  # item 0: knew it, flipped
        # item 1: only its answer's token counts (what follows it may change); item 2's moved
        "others_unchanged": (1, 2),
        # item 3's answer span is its longer answer's, 2 tokens: [1, 1] both times
        "pinned_as_before": (3, 4),
        "edited_pinned_as_before": (2, 2),
    }
    assert r["pinned_as_before"]["share"] == 0.75
    # item 0's new value is one the training text holds, item 3's is not; old answers: 0, 1 seen
    seen = [(True, True), (True, True), (False, False), (False, False)]
    split = flip_rates(answers, before, after, pinned, [True, False, False, True], seen)
    got = {k: (v["count"], v["n"]) for k, v in split.items() if k not in r}
    assert got == {
        "edited_follow_new_seen": (1, 1),
        "edited_follow_new_unseen": (1, 1),
        "baseline_exact_seen": (2, 2),
        "baseline_exact_unseen": (1, 2),
    }  # item 3 missed its old answer


def test_seen_in_finds_whole_values_in_the_training_text():
    assert seen_in("Q: Where?\nA: Droukteinstus.\nQ: When?\nA: 1723.", [" Droukteinstus", " 1799", " 172"]) == [
        True,
        False,
        False,
    ]


def test_memory_rates_count_each_case():
    p = Probe("Q: When was X founded?\nA:", " 1723", ("e1",), 1)
    items = [Item(p, " 1799"), Item(Probe("Q: Who?\nA:", " Bo", ("e2",), 2))]
    src = "d1-0"

    def reading(read: list[str], text: str, other: str = "Bo made it.") -> list[Reading]:
        texts = {src: text, "d9-0": "founded in 1799 too"}
        return [
            Reading([], "", read, {r: texts[r] for r in read}, {src: text}),
            Reading([], "", ["d2-0"], {"d2-0": other}, {"d2-0": other}),
        ]

    before = reading([src], "X was founded in 1723.")
    after = reading(["d9-0"], "X was founded in 1799.", "Bo made it, edited.")  # did not read its source
    pinned = reading([src], "X was founded in 1723.")
    m = {k: (v["count"], v["n"]) for k, v in memory_rates(items, before, after, pinned).items()}
    assert m["source_new_before"] == (0, 1) and m["source_new_after"] == (1, 1) and m["source_new_pinned"] == (0, 1)
    assert m["read_source_before"] == (1, 1) and m["read_source_after"] == (0, 1)
    # another entity's description holding the new value is not the item's memory
    assert m["read_new_after"] == (0, 1) and m["read_old_before"] == (1, 1) and m["read_old_pinned"] == (1, 1)
    assert m["pinned_reads_as_before"] == (2, 2)
    assert m["others_read_same_refs"] == (1, 1)  # same reference, its text moved: retrieval did not
    assert m["untouched_read_same_refs"] == m["untouched_read_same_best"] == (1, 1)
    sibling = [Item(Probe("Q: Where is X?\nA:", " north", ("e1",), 3))]  # the edited record's other item
    moved = [Reading([], "", ["d3-0"], {"d3-0": "y"}, {src: "z"})]
    m = memory_rates(
        items + sibling, before + moved, after + [Reading([], "", ["d4-0"], {"d4-0": "y"}, {})], pinned + moved
    )
    assert (m["others_read_same_refs"]["count"], m["others_read_same_refs"]["n"]) == (1, 2)
    assert (m["untouched_read_same_refs"]["count"], m["untouched_read_same_refs"]["n"]) == (1, 1)
