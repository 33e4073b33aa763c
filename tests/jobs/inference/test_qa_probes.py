"""Knowledge QA probes (jobs/inference/qa_probes.py, `infer.eval.probes`): a user's file read line
by line (a bad line is a one-line error naming file:line), and items scored on a real bank
(tests/jobs/inference/conftest.py) in every mode: the rows exist and pair per item, the oracle
reads exactly the source document's references (found from the corpus record id), random
memories never the source's, RAG the references the memory mode read, and exact match is what
greedy decoding produces (hand-built answers)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from jobs.config import ConfigError, load_config
from jobs.inference.engine import Inference
from jobs.inference.qa_probes import MEMORY, ORACLE, RANDOM, read_probes, run_qa, score, source_refs
from jobs.inference.stats import CONTROL
from model.generation import score_continuation
from model.memory import no_memories
from pipelines.readers import doc_id


def write(tmp_path, lines, name="probe.jsonl"):
    p = tmp_path / name
    p.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return str(p)


GOOD = json.dumps({"prompt": "Q: When was X born?\nA:", "answer": " 1842", "source_ids": ["e000123"], "entity": "X"})


@pytest.mark.parametrize(
    "line, why",
    [
        ('{"prompt": "Q", "answer": " a"', "not valid JSON"),
        ('"just a string"', "expected a JSON object with 'prompt' and 'answer', got str"),
        ('{"prompt": "Q: x?"}', "no 'answer'"),
        ('{"prompt": "  ", "answer": " a"}', "'prompt' must be a non-empty string"),
        ('{"prompt": "Q", "answer": 1842}', "'answer' must be a non-empty string, got 1842"),
        ('{"prompt": "Q", "answer": " a", "source_ids": "e1"}', "'source_ids' must be a list of record ids"),
        ('{"prompt": "Q", "answer": " a", "source_ids": [null]}', "'source_ids' must be a list of record ids"),
    ],
)
def test_a_malformed_line_is_one_error_naming_file_line_and_what_is_wrong(tmp_path, line, why):
    path = write(tmp_path, [GOOD, "", line, GOOD])
    with pytest.raises(ConfigError) as e:
        read_probes(path)
    msg = str(e.value)
    assert msg.startswith(f"{path}:3: ") and why in msg and "\n" not in msg


def test_a_probe_file_reads_its_items_and_a_missing_or_empty_one_is_an_error(tmp_path):
    items = read_probes(
        write(
            tmp_path,
            [
                GOOD,
                "   ",
                json.dumps({"prompt": "P", "answer": "A", "source_ids": [7]}),
                json.dumps({"prompt": "P2", "answer": "A2"}),
            ],
        )
    )
    assert [(p.prompt, p.answer, p.source_ids, p.line) for p in items] == [
        ("Q: When was X born?\nA:", " 1842", ("e000123",), 1),
        ("P", "A", ("7",), 3),
        ("P2", "A2", (), 4),
    ]
    with pytest.raises(ConfigError, match="infer.eval.probes: no such file"):
        read_probes(str(tmp_path / "absent.jsonl"))
    with pytest.raises(ConfigError, match="holds no probe items"):
        read_probes(write(tmp_path, ["", " "], "empty.jsonl"))
    (tmp_path / "latin1.jsonl").write_bytes(b'{"prompt": "caf\xe9", "answer": "x"}\n')
    with pytest.raises(ConfigError, match="not UTF-8"):
        read_probes(str(tmp_path / "latin1.jsonl"))


def test_m3_eval_stops_at_a_bad_probe_line_in_one_line_before_any_scoring(tmp_path, capsys):
    from jobs.cli.main import main

    path = write(tmp_path, [GOOD, '{"prompt": "Q"}'])
    assert (
        main(
            [
                "eval",
                "-c",
                "configs/demo.yaml",
                "--set",
                f"bank.uri={tmp_path / 'no-bank'}",
                "--set",
                f"infer.eval.probes=[{path}]",
            ]
        )
        == 2
    )
    err = capsys.readouterr().err.strip()
    assert err.endswith(f"{path}:2: no 'answer' (each line needs 'prompt' and 'answer')") and "\n" not in err


def test_the_config_key_is_checked_like_the_others():
    assert load_config("configs/demo.yaml").infer.eval.probes == ()
    cfg = load_config("configs/demo.yaml", ["infer.eval.probes=[a.jsonl, b.jsonl]"])
    assert cfg.infer.eval.probes == ("a.jsonl", "b.jsonl")
    for bad, why in (
        ("infer.eval.probes=3", "expected a list of a string"),
        ('infer.eval.probes=[""]', "infer.eval.probes[0] (--set): expected the path of a JSONL file"),
        ("infer.eval.probe=[a.jsonl]", "did you mean 'infer.eval.probes'"),
    ):
        with pytest.raises(ConfigError, match="infer.eval.probe") as e:
            load_config("configs/demo.yaml", [bad])
        assert why in str(e.value)


# -- on a real bank

slow = pytest.mark.slow


@pytest.fixture(scope="module")
def inf(reader_bank):
    return Inference(reader_bank[0])


def bank_probes(inf, n=5):
    """QA items made from documents of the bank: the first words of a document's first reference
    are the prompt, the next words the answer, the record id the source."""
    import pyarrow.compute as pc

    docs = (
        inf.bank.dataset("documents")
        .to_table(columns=["doc_id", "source", "source_id"], filter=pc.field("in_bank"))
        .to_pylist()[:n]
    )
    items = []
    for d in docs:
        assert doc_id(d["source"], d["source_id"]) == d["doc_id"]  # how a record id names a document
        refs = (
            inf.bank.dataset("refs")
            .to_table(columns=["ref_id", "text", "ordinal"], filter=pc.field("doc_id") == d["doc_id"])
            .to_pylist()
        )
        words = min(refs, key=lambda r: r["ordinal"])["text"].split()
        items.append(
            {
                "prompt": " ".join(words[:6]),
                "answer": " " + " ".join(words[6:9]),
                "source_ids": [d["source_id"]],
                "refs": sorted(r["ref_id"] for r in refs),
            }
        )
    return items


@slow
def test_source_ids_resolve_to_the_references_of_their_document(inf):
    items = bank_probes(inf)
    found = source_refs(inf.bank, [s for it in items for s in it["source_ids"]] + ["no-such-record"])
    assert "no-such-record" not in found
    for it in items:
        refs = [r for r, _ in found[it["source_ids"][0]]]
        assert sorted(refs) == it["refs"] and [int(r.rsplit("-", 1)[1]) for r in refs] == sorted(
            int(r.rsplit("-", 1)[1]) for r in refs
        )


@slow
def test_every_mode_is_scored_and_paired_per_item(inf, tmp_path, capsys):
    items = bank_probes(inf)
    lines = [json.dumps({k: it[k] for k in ("prompt", "answer", "source_ids")}) for it in items]
    lines.append(json.dumps({"prompt": items[0]["prompt"], "answer": " nothing", "source_ids": ["no-such-record"]}))
    path = write(tmp_path, lines)
    M = inf.model.config.mems_per_chunk
    r = run_qa(inf, path, read_probes(path), control=(inf.model, True), batch_size=2, seed=3)
    modes = r["modes"]
    assert list(modes) == ["none", CONTROL, MEMORY, ORACLE, RANDOM, "rag"]
    n = len(lines)
    assert r["items"] == n and r["with_sources"] == n - 1 and r["n_source_ids_not_in_bank"] == 1
    for name, m in modes.items():
        assert len(m["per_item"]) == len(m["exact"]) == len(m["reads"]) == len(m["greedy"]) == n
        if name != "none":
            assert m["vs_none"]["of"] == (n - 1 if name == ORACLE else n)
            # token-weighted like the losses: the gain is their difference over the items both scored
            k = [(i, r["answer_lengths"][i]) for i, x in enumerate(m["per_item"]) if x is not None]
            diff = sum((modes["none"]["per_item"][i] - m["per_item"][i]) * w for i, w in k) / sum(w for _, w in k)
            assert m["vs_none"]["gain"] == pytest.approx(diff, abs=1e-4)
            if name != ORACLE:  # over every item: the difference of the two losses shown
                assert m["vs_none"]["gain"] == pytest.approx(modes["none"]["loss"] - m["loss"], abs=2e-4)
    assert len(set(r["answer_lengths"])) > 1
    # the control given here is the same weights, sink kept: it scores exactly as none
    assert modes[CONTROL]["per_item"] == modes["none"]["per_item"]
    assert modes[MEMORY]["vs_control"] == modes[MEMORY]["vs_none"]
    # the oracle reads exactly the source document's references (all, when they fit a chunk's
    # M memories), in every chunk of the answer; the item without a source is not scored
    for i, it in enumerate(items):
        reads = modes[ORACLE]["reads"][i]
        assert reads and all(set(c) <= set(it["refs"]) and len(c) == min(M, len(it["refs"])) for c in reads)
        if len(it["refs"]) <= M:
            assert all(sorted(c) == it["refs"] for c in reads)
        assert not set(it["refs"]) & {x for c in modes[RANDOM]["reads"][i] for x in c}
        assert all(len(c) == M for c in modes[RANDOM]["reads"][i])
        assert modes["rag"]["reads"][i] == [modes[MEMORY]["reads"][i][0]]
    assert modes[ORACLE]["per_item"][-1] is None and modes[ORACLE]["exact"][-1] is None
    assert modes[ORACLE]["read_source"] == n - 1
    assert modes["none"]["reads"] == [[]] * n
    assert all(m["reads"][i] for m in (modes[MEMORY], modes[RANDOM]) for i in range(n))
    from jobs.inference.eval_report import mode_lines

    table = "\n".join(mode_lines(modes))
    assert "exact" in table and ORACLE in table and "gain over the control" in table


@slow
def test_exact_match_is_what_greedy_decoding_produces(inf):
    """Hand-built answers: the greedy continuation itself (exact), the same with its last or
    first token changed (not exact); the teacher-forced losses are those of a whole forward."""
    model, cs = inf.model, inf.model.config.mem_chunk_size
    prompt = inf.encode("A compiler is a program")
    outs = inf.generate_tokens([prompt], "none", max_new_tokens=4, stop_at_eos=False)
    greedy = outs[0].tokens
    other = lambda t: (t + 7) % model.config.vocab_size  # noqa: E731
    answers = [greedy, greedy[:-1] + [other(greedy[-1])], [other(greedy[0])] + greedy[1:], greedy[:2]]
    got = score(model, [prompt] * 4, answers, sink=True)
    assert got["exact"] == [True, False, False, True]
    assert all(g == greedy[: len(a)] for g, a in zip(got["greedy"], answers))
    losses, hits, _ = score_continuation(model, torch.tensor([prompt, prompt]), torch.tensor(answers[:2]), sink=True)
    assert hits[0].all() and hits[1, :-1].all() and not hits[1, -1]
    for a, total in zip(answers, got["total"]):
        ctx = torch.tensor([prompt + a])
        with torch.no_grad():
            logits = model(ctx, *no_memories(model.config, 1, -(-ctx.shape[1] // cs)))[0]
        want = torch.nn.functional.cross_entropy(logits[len(prompt) - 1 : -1], ctx[0, len(prompt) :], reduction="sum")
        assert total == pytest.approx(float(want), rel=1e-4)
    assert np.array_equal(got["count"], [len(a) for a in answers])


def test_the_oracle_ranks_the_sources_by_the_configured_method(facts_bm25_bank):
    """More sources than memories: the k kept are the ones serving's ranking (retrieval.method)
    puts first; vector keeps the embedder's order, as before the method existed."""
    from jobs.inference.qa_probes import _closest
    from storage.bank import Bank
    from tests.jobs.inference.test_retriever import entity_of, facts_retriever

    cfg, names = facts_bm25_bank
    refs = Bank(cfg.bank.uri).dataset("refs").to_table(columns=["ref_id", "text"])
    pairs = list(zip(refs.column("ref_id").to_pylist(), refs.column("text").to_pylist()))
    owner = entity_of(Bank(cfg.bank.uri), [r for r, _ in pairs])
    own = {e: p for e, p in zip(owner, pairs)}
    others = [p for e, p in zip(owner, pairs) if e not in names][:5]
    entities = list(names)[:4]
    prompts = [f"Q: Where was {names[e]} born?\nA:" for e in entities]
    sources = [others + [own[e]] for e in entities]  # the entity's own last: only a ranking moves it up
    assert [g[0] for g in _closest(facts_retriever(cfg, "bm25"), prompts, sources, 2)] == [own[e][0] for e in entities]
    assert all(own[e][0] in g for e, g in zip(entities, _closest(facts_retriever(cfg, "hybrid"), prompts, sources, 2)))
    vector = facts_retriever(cfg, "vector")
    for prompt, src, got in zip(prompts, sources, _closest(vector, prompts, sources, 2)):
        vecs = vector.embedder.embed([prompt] + [x for _, x in src])
        assert got == [src[j][0] for j in np.argsort(-(vecs[1:] @ vecs[0]), kind="stable")[:2]]
    assert _closest(vector, prompts[:1], [sources[0][:2]], 2) == [[r for r, _ in sources[0][:2]]]  # all fit
