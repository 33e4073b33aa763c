"""The honest evaluation (jobs/inference/evaluate.py) on a real bank: a tiny model that "was trained to
read memories" (its export.json, as the trainer writes it, says so), memories encoded into
LanceDB, real retrieval (tests/jobs/inference/conftest.py).

Each test is built to fail if its fix were undone: the no-memory baseline keeps the sink, the
memory mode reads the memories (masking them gives exactly the baseline), chunk c reads what
chunk c-1 retrieved, no scored token reads a reference of its own document or one that overlaps
its whole sequence (checked in what the eval read, not in what it prints), the probe's headline
never reads the scored entry's document, gains are the differences of the losses shown, RAG
rows of a batch score as alone, the headline is against the equal-compute control (or says it
is missing), the served bank is what the model's on-the-fly encoding gives, a bank the model
was not trained to read is refused, and another training schedule is warned about."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from jobs.inference.engine import Inference
from jobs.inference.evaluate import (
    CONTROL,
    Items,
    evaluate_items,
    heldout_items,
    item_losses,
    probe_items,
    probe_modes,
    retrieval_ids,
    run_eval,
)
from jobs.inference.retriever import EncodingStore
from jobs.inference.stats import paired
from model import Memory3, save_model
from model.codecs import make_codec
from model.memory import no_memories
from pipelines.overlap import overlap
from storage.bank import Bank, BankError
from tests.jobs.inference.conftest import write_export

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def bank(reader_bank):
    return reader_bank[0]


@pytest.fixture(scope="module")
def inf(bank):
    return Inference(bank)


def items_of(cfg, inf) -> Items:
    return heldout_items(inf.bank, cfg.train.heldout_fraction, 6, 96, inf.model.config.mem_chunk_size)


def test_none_keeps_the_sink_the_model_was_trained_with(bank, inf):
    items = items_of(bank, inf)
    model, cs = inf.model, inf.model.config.mem_chunk_size
    total, count = item_losses(model, items, "none", sink=True)
    tokens = torch.tensor(items.tokens)
    with torch.no_grad():
        for logits, want_sink in (
            (model(tokens, *no_memories(model.config, len(items), 96 // cs)), True),
            (model(tokens), False),
        ):
            losses = torch.nn.functional.cross_entropy(
                logits[:, cs - 1 : -1].reshape(-1, logits.shape[-1]), tokens[:, cs:].reshape(-1), reduction="none"
            )
            got = losses.view(len(items), -1).sum(1).numpy()
            assert np.allclose(got, total, atol=1e-4) is want_sink  # the sink baseline, not the plain one
    assert (count == 96 - cs).all()


class MaskedStore:
    """The bank's memories with every slot masked out: what "memory" scores if it reads nothing."""

    def __init__(self, store):
        self.store, self.shape, self.hits, self.misses = store, store.shape, 0, 0

    def fetch(self, ids):
        mems, mask = self.store.fetch(ids)
        return mems, torch.zeros_like(mask)


def test_memory_mode_reads_the_memories(bank, inf):
    items = items_of(bank, inf)
    r = inf.memory_retriever()
    cs = inf.model.config.mem_chunk_size
    ids = retrieval_ids(r, items, cs, exclude_own=True)
    none = item_losses(inf.model, items, "none", sink=True)
    read = item_losses(inf.model, items, "memory", sink=True, retriever=r, ids=ids)
    masked = item_losses(inf.model, items, "memory", sink=True, retriever=r.with_store(MaskedStore(r.store)), ids=ids)
    assert np.allclose(masked[0], none[0], atol=1e-4)  # reading nothing is exactly the baseline
    assert np.abs(read[0] - none[0]).max() / (96 - cs) > 1e-2  # what is read reaches the logits
    strict = {"max_overlap": r.max_overlap, "exclude_own": True}
    out = evaluate_items(
        inf.model,
        items,
        sink=True,
        retriever=r,
        modes={"none": ("none", None, strict), "memory": ("memory", None, strict)},
    )
    assert out["memory"]["vs_none"]["of"] == len(items) and out["memory"]["vs_none"]["stderr"] > 0


def test_no_scored_token_reads_its_own_text(bank, inf):
    """Strict retrieval: no reference of the item's own documents, none overlapping the WHOLE
    stored sequence by more than 2/3. The fixture has references that the old rules (overlap
    against the scored window only, own documents allowed) let through: the filter has work."""
    items = items_of(bank, inf)
    r = inf.retriever()
    cs = inf.model.config.mem_chunk_size
    ids = retrieval_ids(r, items, cs, exclude_own=True)
    refs = r.ref_tokens({x for row in ids for c in row for x in c})
    read = [(i, x) for i, row in enumerate(ids) for c in row for x in c]
    assert read
    for i, x in read:
        assert r.ref_docs[x] not in items.docs[i]
        assert overlap(items.contexts[i], refs[x]) <= 2 / 3
    window = Items(items.tokens, items.tokens, [set() for _ in items.tokens])  # the old, leaky rules
    old = retrieval_ids(r, window, cs, exclude_own=False)
    leaked = [x for i, row in enumerate(old) for c in row for x in c if r.ref_docs[x] in items.docs[i]]
    assert leaked


def test_the_served_bank_is_what_on_the_fly_encoding_gives(bank, inf):
    """The training stage's evidence encodes references on the fly at the sparsity and codec the
    model was trained with; the bank stores the same memories. Not bit for bit: the encode job
    pads other batches, and with these large random weights a near-tie between two tokens' scores
    can then fall the other way, so a few memories keep another token in some head."""
    r = inf.memory_retriever()
    ids = r.ref_tokens(
        Bank(bank.bank.uri).dataset("refs").to_table(columns=["ref_id"]).column("ref_id").to_pylist()[:12]
    )
    ids = sorted(ids)
    fly = EncodingStore(inf.model, r.ref_tokens, top_k=inf.model.config.mem_top_k, codec=make_codec("raw-fp32"))
    m1, k1 = r.store.fetch(ids)
    m2, k2 = fly.fetch(ids)
    assert torch.equal(k1, k2)
    same = [torch.allclose(a, b, atol=1e-4, rtol=1e-4) for a, b in zip(m1, m2)]
    assert sum(same) >= 0.75 * len(ids)
    dense = EncodingStore(inf.model, r.ref_tokens)
    assert dense.fetch(ids[:2])[0].shape[-2] == inf.model.config.ref_max_tokens


def test_chunk_c_reads_what_chunk_c_minus_1_retrieved(bank, inf):
    """retrieval_ids against searches made by hand: chunk 0 reads what the prompt retrieved,
    chunk c >= 1 what chunk c-1's tokens retrieved (never its own: that is checked to differ)."""
    r = inf.retriever()
    cs = inf.model.config.mem_chunk_size
    probe, _ = probe_items(inf.bank, inf.tokenizer, bank.train.heldout_fraction, 3, inf.model.config.eos_id)
    own_text_differs = False
    for items in (items_of(bank, inf), probe):
        ids = retrieval_ids(r, items, cs, exclude_own=True)
        for i, (toks, ctx, docs) in enumerate(zip(items.tokens, items.contexts, items.docs)):
            C = -(-len(toks) // cs)
            queries = [toks[: min(items.prompt(i, cs), cs)]] + [toks[(c - 1) * cs : c * cs] for c in range(1, C)]
            assert ids[i] == r.search_ids(queries, [ctx] * C, [docs] * C)
            own = r.search_ids([toks[c * cs : (c + 1) * cs] for c in range(C)], [ctx] * C, [docs] * C)
            own_text_differs |= any(a != b for a, b in zip(ids[i][1:], own[1:]))
    assert own_text_differs


def test_rag_rows_of_a_batch_score_as_each_alone(bank, inf):
    """RAG contexts of different lengths in one batch: each item's loss is the one it gets in a
    batch of its own (no pad is attended, no position shifted)."""
    items = items_of(bank, inf)
    r = inf.memory_retriever()
    cs = inf.model.config.mem_chunk_size
    ids = retrieval_ids(r, items, cs, exclude_own=True)
    refs = r.ref_tokens({x for row in ids for c in row for x in c})
    widths = {sum(len(refs[x]) + 1 for x in ids[i][1]) + len(items.tokens[i]) for i in range(len(items))}
    assert len(widths) > 1
    together = item_losses(inf.model, items, "rag", sink=True, retriever=r, ids=ids, batch_size=len(items))
    alone = item_losses(inf.model, items, "rag", sink=True, retriever=r, ids=ids, batch_size=1)
    assert np.array_equal(together[1], alone[1])
    np.testing.assert_allclose(together[0], alone[0], rtol=1e-5, atol=1e-3)


def test_the_probe_headline_never_reads_the_scored_entry_s_document(bank, inf):
    """The probe's "memory" row: no reference of the scored entry's document (the entry itself
    among them) nor one overlapping the entry by more than 2/3; the look-up row does read the
    entry's document, so the filter has work. Its gains are the differences of the losses shown
    although the definitions differ in length (token-weighted, like the losses)."""
    probe, _ = probe_items(inf.bank, inf.tokenizer, bank.train.heldout_fraction, 8, inf.model.config.eos_id)
    assert len(probe) >= 3 and len({len(t) - p for t, p in zip(probe.tokens, probe.prompts)}) > 1
    r = inf.memory_retriever()
    out = evaluate_items(inf.model, probe, sink=True, modes=probe_modes(r.max_overlap), retriever=r)
    assert list(out) == ["none", "memory", "memory, bank holds the entry"]
    refs = r.ref_tokens({x for m in out.values() for row in m.get("reads", []) for c in row for x in c})
    read = [(i, x) for i, row in enumerate(out["memory"]["reads"]) for c in row for x in c]
    assert read
    for i, x in read:
        assert r.ref_docs[x] not in probe.docs[i]
        assert overlap(probe.contexts[i], refs[x]) <= r.max_overlap
    lookup = out["memory, bank holds the entry"]["reads"]
    assert any(r.ref_docs[x] in probe.docs[i] for i, row in enumerate(lookup) for c in row for x in c)
    for name in ("memory", "memory, bank holds the entry"):
        assert out[name]["vs_none"]["gain"] == pytest.approx(out["none"]["loss"] - out[name]["loss"], abs=2e-4)


def test_eval_table_with_baselines_controls_and_paired_errors(bank, inf, capsys):
    res = run_eval(bank, inference=inf)
    modes = res["modes"]
    assert res["sink"] is True and set(modes) == {
        "none",
        "memory",
        "memory, another sequence's (control)",
        "memory, dense raw (same references)",
        "rag",
    }
    assert len({m["tokens"] for m in modes.values()}) == 1
    for name, m in modes.items():
        if name != "none":
            p = m["vs_none"]
            assert p["of"] == res["sequences"]
            assert p["gain"] == pytest.approx(modes["none"]["loss"] - m["loss"], abs=2e-4)
    assert set(res["probe"]["modes"]) == {"none", "memory", "memory, bank holds the entry"}
    assert "no model in" in res["headline"]["missing"]  # no control trained: said, the rest shown
    # the held-out filters, by what they removed: the eval's reads hold no reference of the
    # sequence's own documents nor one overlapping it by > 2/3; unfiltered retrieval has some
    items = items_of(bank, inf)
    assert res["sequences"] == len(items)
    r = inf.retriever()
    cs = inf.model.config.mem_chunk_size
    read = modes["memory"]["reads"]
    refs = r.ref_tokens({x for row in read for c in row for x in c})
    assert refs
    for i, row in enumerate(read):
        assert len(row) == -(-len(items.tokens[i]) // cs)
        for x in (x for c in row for x in c):
            assert r.ref_docs[x] not in items.docs[i]
            assert overlap(items.contexts[i], refs[x]) <= 2 / 3
    leaky = retrieval_ids(r.with_filter(None), items, cs, exclude_own=False)
    assert any(r.ref_docs[x] in items.docs[i] for i, row in enumerate(leaky) for c in row for x in c)
    saved = json.loads((Path(bank.bank.uri) / "eval" / "eval.json").read_text())
    assert saved["modes"]["memory"]["reads"] == read
    out = capsys.readouterr().out
    assert "gain over none (paired)" in out and "the equal-compute control is missing" in out
    assert "none (same weights: diagnostic)" in out


def test_the_headline_is_the_memory_model_against_the_equal_compute_control(bank, tmp_path, capsys):
    """A control model where the control training stage exports it: scored without memory on
    the same items, and the memory model's gain over it, paired per sequence, is the headline.
    A QA probe file (infer.eval.probes) gets its rows, the control's among them."""
    from tests.jobs.inference.test_qa_probes import bank_probes

    path = Bank.of(bank).trained_model("control")
    torch.manual_seed(7)
    save_model(Memory3(dataclasses.replace(bank.model, init_std=0.2)), path)
    write_export(bank, path, train=dataclasses.replace(bank.train, continual_with_memory=False))
    try:
        inf = Inference(bank)
        qa = tmp_path / "qa.jsonl"
        qa.write_text(
            "".join(
                json.dumps({k: it[k] for k in ("prompt", "answer", "source_ids")}) + "\n" for it in bank_probes(inf, 3)
            )
        )
        cfg = dataclasses.replace(
            bank, infer=dataclasses.replace(bank.infer, eval=dataclasses.replace(bank.infer.eval, probes=(str(qa),)))
        )
        res = run_eval(cfg, inference=inf)
        control = inf.control()["model"]
    finally:
        shutil.rmtree(path.parent)
    assert len(res["qa"]) == 1 and res["qa"][0]["items"] == 3 and res["qa"][0]["file"] == str(qa)
    assert list(res["qa"][0]["modes"])[:3] == ["none", CONTROL, "memory"]
    modes = res["modes"]
    assert list(modes)[:2] == ["none", CONTROL] and res["control"]["path"] == str(path)
    items = items_of(bank, inf)
    total, count = item_losses(control, items, "none", sink=False)  # plain: it never read memories
    assert modes[CONTROL]["per_item"] == pytest.approx(list(total / count), abs=1e-5)
    mem = item_losses(
        inf.model, items, "memory", sink=True, retriever=inf.memory_retriever(), ids=modes["memory"]["reads"]
    )
    want = paired((total, count), mem)
    h = res["headline"]
    assert h["comparison"] == f"memory vs {CONTROL}" and h["of"] == len(items)
    assert h["gain"] == pytest.approx(want["gain"], abs=1e-5) and h["stderr"] == pytest.approx(want["stderr"], abs=1e-5)
    assert h["gain"] == pytest.approx(modes[CONTROL]["loss"] - modes["memory"]["loss"], abs=2e-4)
    assert all("vs_control" in m for name, m in modes.items() if name != CONTROL)
    assert CONTROL in res["probe"]["modes"]
    out = capsys.readouterr().out
    assert "headline: the served memory model vs the equal-compute control" in out
    assert f"QA probe {qa}: 3 items" in out and "memory, the source's own (oracle)" in out


def test_a_bank_the_model_was_not_trained_to_read_is_refused(bank, tmp_path, capsys):
    ckpt = tmp_path / "dense-reader"
    shutil.copytree(bank.infer.checkpoint, ckpt)
    write_export(bank, ckpt, top_k=3)
    cfg = dataclasses.replace(bank, infer=dataclasses.replace(bank.infer, checkpoint=str(ckpt)))
    with pytest.raises(BankError, match="trained to read 3 tokens per head, the bank keeps"):
        Inference(cfg).store()
    lenient = dataclasses.replace(cfg, infer=dataclasses.replace(cfg.infer, allow_memory_mismatch=True))
    Inference(lenient).store()
    assert "WARNING: serving memories the model was not trained to read" in capsys.readouterr().out


def test_a_model_trained_on_another_schedule_is_served_with_a_warning(bank, tmp_path, capsys):
    Inference(bank).store()  # the fixture's model was trained on the serving schedule
    assert "WARNING" not in capsys.readouterr().out
    ckpt = tmp_path / "paper-reader"
    shutil.copytree(bank.infer.checkpoint, ckpt)
    write_export(bank, ckpt, schedule="paper")
    cfg = dataclasses.replace(bank, infer=dataclasses.replace(bank.infer, checkpoint=str(ckpt)))
    Inference(cfg).store()  # served all the same: the memories are the ones it reads
    assert "trained on the 'paper' memory schedule" in capsys.readouterr().out


def test_eval_build_evaluates_the_pinned_build_beside_the_live_one(edited_facts_bank, tmp_path, capsys):
    """`m3 eval --build -1`: the build before live, with the model its memories name, written to
    eval-build-<N>.json (the live build's eval.json is not touched) and said in the table."""
    from jobs.cli.main import main
    from storage.layout import BankLayout
    from tests.conftest import FACTS

    eb = edited_facts_bank
    qa = tmp_path / "qa.jsonl"
    qa.write_text(
        "".join(
            line + "\n"
            for line in (FACTS / "probe.jsonl").read_text().splitlines()
            if any(e["id"] in line for e in eb.edits)
        )
    )
    sets = sum(
        (
            ["--set", o]
            for o in [
                *eb.sets2,
                f"infer.eval.probes=[{qa}]",
                "train.heldout_fraction=0.5",
                "infer.eval.sequences=2",
                "infer.eval.tokens=96",
                "infer.eval.probe_refs=2",
                "infer.eval.batch_size=2",
            ]
        ),
        [],
    )
    assert main(["eval", "-c", "configs/facts.yaml", *sets, "--build", "-1"]) == 0
    out = BankLayout(eb.cfg2.bank.uri).eval()
    res = json.loads((out / "eval-build-1.json").read_text())
    assert not (out / "eval.json").exists()
    assert res["build"]["build"] == 1 and not res["build"]["live"] and res["checkpoint"] == str(eb.ckpt)
    assert res["qa"][0]["items"] == 4 * len(eb.edits)
    assert capsys.readouterr().out.startswith("published build 1, not the live one (tables: ")
