"""Generation against a real bank (FOLDOC refs, real LanceDB and retrieval, memories encoded by
a random-weight tiny model saved with the export.json the trainer writes: it reads memories,
behind the ref_bos sink): what is read reaches the greedy tokens and is what each chunk
recorded, the no-memory mode keeps the sink, batched equals single-prompt (RAG too), one
embed/search/fetch per swap point, the overlap filter, the RAM cache, lineage refusal, the CLI
(--show-memories, JSONL); a published build other than live (`--build`), served with the model
its memories name. `m3 eval` is tested in test_evaluate.py."""

from __future__ import annotations

import dataclasses
import json
import re
import shutil

import pytest
import torch

from jobs.cli.main import main
from jobs.inference.engine import Inference
from jobs.inference.generate import sample_generation
from jobs.ops.rebuild import run_rebuild
from model import Memory3, save_model
from model.checkpoint import saved_hash
from model.memory import no_memories
from pipelines.overlap import overlap
from storage.bank import Bank, BankError
from tests.jobs.inference.conftest import TINY, write_export  # noqa: F401 (TINY: test_retriever's bank settings)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def bank(reader_bank):
    return reader_bank


@pytest.fixture(scope="module")
def inf(bank):
    return Inference(bank[0])


def ref_rows(cfg, n=None):
    rows = Bank(cfg.bank.uri).dataset("refs").to_table(columns=["ref_id", "token_ids", "text"]).to_pylist()
    return rows[:n] if n else rows


def test_batched_equals_single_prompt_and_one_retrieval_per_swap_point(bank, inf):
    cfg, _ = bank
    cs = inf.model.config.mem_chunk_size
    prompts = [r["token_ids"][: cs + 5] for r in ref_rows(cfg) if len(r["token_ids"]) > cs + 5][:4]
    n_new = 3 * cs  # swaps at cs and 2*cs
    r = inf.memory_retriever()
    before = dict(r.counts)
    batched = inf.generate_tokens(
        prompts, "memory", max_new_tokens=n_new, seeds=[1, 2, 3, 4], batch_size=4, stop_at_eos=False
    )
    spent = {k: r.counts[k] - before.get(k, 0) for k in ("embed", "search", "fetch")}
    assert spent == {"embed": 3, "search": 3, "fetch": 3}  # prompt chunks, then 2 swaps, all rows at once
    singles = [
        inf.generate_tokens([p], "memory", max_new_tokens=n_new, seeds=[s], batch_size=1, stop_at_eos=False)[0]
        for p, s in zip(prompts, [1, 2, 3, 4])
    ]
    for one, many in zip(singles, batched):
        assert one.tokens == many.tokens and len(one.tokens) == n_new
        assert [vars(c) for c in one.reads] == [vars(c) for c in many.reads]
    reads = batched[0].reads
    assert [(c.start, c.end) for c in reads] == [
        (0, cs),
        (cs, cs + 5),
        (cs + 5, 2 * cs + 5),
        (2 * cs + 5, 3 * cs + 5),
        (3 * cs + 5, 4 * cs + 5),
    ]
    known = {row["ref_id"] for row in ref_rows(cfg)}
    assert all(len(c.ref_ids) <= inf.model.config.mems_per_chunk and set(c.ref_ids) <= known for c in reads)


def test_overlap_filter_drops_a_reference_the_context_contains(bank, inf):
    cfg, _ = bank
    r = inf.retriever()
    rows = [x for x in ref_rows(cfg) if len(x["token_ids"]) >= 40][:6]
    queries = [x["token_ids"] for x in rows]
    unfiltered = r.with_filter(None).search_ids(queries, queries)
    filtered = r.search_ids(queries, queries)
    refs = r.ref_tokens({i for row in unfiltered + filtered for i in row})
    for row, hits, kept in zip(rows, unfiltered, filtered):
        assert row["ref_id"] in hits  # its own text retrieves it...
        assert row["ref_id"] not in kept  # ...and the filter (overlap 1.0 > 2/3) drops it
        assert all(overlap(row["token_ids"], refs[i]) <= 2 / 3 for i in kept)
        assert len(kept) == inf.model.config.mems_per_chunk  # filled from the further candidates


def test_ram_cache_serves_repeated_references(bank):
    cfg, _ = bank
    inf = Inference(cfg)  # a fresh store: an empty cache
    prompt = ref_rows(cfg, 1)[0]["token_ids"][:20]
    first = inf.generate_tokens([prompt], "memory", max_new_tokens=8)[0]
    store = inf.store()
    read = {i for c in first.reads for i in c.ref_ids}
    assert store.misses == len(read) and store.hits == sum(len(c.ref_ids) for c in first.reads[:2]) - len(read)
    hits, misses = store.hits, store.misses
    again = inf.generate_tokens([prompt], "memory", max_new_tokens=8)[0]
    assert again.tokens == first.tokens
    assert store.misses == misses and store.hits == hits + sum(len(c.ref_ids) for c in first.reads[:2])


def test_the_store_is_bound_by_infer_cache_bytes(bank):
    cfg, _ = bank
    inf = Inference(dataclasses.replace(cfg, infer=dataclasses.replace(cfg.infer, cache_size=7)))
    assert inf.store().capacity == 7  # cache_bytes null: bound in entries
    inf = Inference(dataclasses.replace(cfg, infer=dataclasses.replace(cfg.infer, cache_bytes=100_000)))
    store = inf.store()
    assert store.capacity == 100_000 // store.entry_bytes() > 0
    prompt = ref_rows(cfg, 1)[0]["token_ids"][:20]
    inf.generate_tokens([prompt], "memory", max_new_tokens=8)
    assert 0 < store.cache_nbytes() <= 100_000


def test_a_model_other_than_the_bank_s_is_refused_naming_both_hashes(bank, tmp_path, capsys):
    cfg, overrides = bank
    torch.manual_seed(123)
    other = save_model(Memory3(cfg.model), tmp_path / "other")
    cfg2 = dataclasses.replace(cfg, infer=dataclasses.replace(cfg.infer, checkpoint=str(other)))
    inf = Inference(cfg2)
    written = Bank(cfg.bank.uri).metadata("memories")["model_hash"]
    with pytest.raises(BankError, match=f"written by model {written}, not by this model {inf.model_hash}"):
        inf.generate(["a compiler"], "memory", max_new_tokens=4)
    assert inf.generate(["a compiler"], "none", max_new_tokens=4)[0].mode == "none"  # no memories read
    args = [
        "generate",
        "-c",
        "configs/demo.yaml",
        *sum((["--set", o] for o in overrides), []),
        "--set",
        f"infer.checkpoint={other}",
        "a compiler",
    ]
    assert main(args) == 2
    assert written in capsys.readouterr().err


def test_cli_show_memories_jsonl_and_the_three_modes(bank, tmp_path, capsys):
    cfg, overrides = bank
    sets = sum((["--set", o] for o in overrides), [])
    assert (
        main(
            ["generate", "-c", "configs/demo.yaml", *sets, "A compiler is", "--max-new-tokens", "20", "--show-memories"]
        )
        == 0
    )
    out = capsys.readouterr().out
    ids = {r["ref_id"] for r in ref_rows(cfg)}
    shown = [line.split()[0] for line in out.splitlines() if line.startswith("    ")]
    assert "read the memories retrieved by tokens [0," in out and shown and set(shown) <= ids
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('"A compiler is"\n{"prompt": "The kernel"}\n\n{"prompt": "Unix"}\n')
    for mode in ("memory", "none", "rag"):
        dst = tmp_path / f"{mode}.jsonl"
        assert (
            main(
                [
                    "generate",
                    "-c",
                    "configs/demo.yaml",
                    *sets,
                    "--prompts",
                    str(prompts),
                    "--mode",
                    mode,
                    "--max-new-tokens",
                    "12",
                    "--output",
                    str(dst),
                ]
            )
            == 0
        )
        rows = [json.loads(line) for line in dst.read_text().splitlines()]
        assert [r["prompt"] for r in rows] == ["A compiler is", "The kernel", "Unix"]
        assert all(r["mode"] == mode and r["new_tokens"] <= 12 for r in rows)
        assert all(bool(r["chunks"]) == (mode == "memory") for r in rows)
        if mode == "rag":
            assert all(len(r["rag_refs"]) == cfg.model.mems_per_chunk and r["rag_refs"][0]["text"] for r in rows)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": 3}\n')
    assert main(["generate", "-c", "configs/demo.yaml", *sets, "--prompts", str(bad)]) == 2
    assert "bad.jsonl:1" in capsys.readouterr().err


def test_sample_generation_reports_text_and_the_references_each_chunk_read(bank, inf):
    cfg, _ = bank
    s = sample_generation(cfg, "A compiler is a program", max_new_tokens=40, inference=inf)
    assert s["model_hash"] == inf.model_hash and s["mode"] == "memory" and isinstance(s["text"], str)
    cs = inf.model.config.mem_chunk_size
    spans = [tuple(c["tokens"]) for c in s["chunks"]]
    assert spans[0][0] == 0 and all(a[1] == b[0] for a, b in zip(spans, spans[1:]))  # contiguous cover
    assert all(c["refs"] and all(r["text"] for r in c["refs"]) for c in s["chunks"])
    # the prompt (< cs tokens) is one chunk; the first generated chunk inherits its memories; every
    # later one queried with the cs tokens before it
    gen = [c for c in s["chunks"] if c["tokens"][0] > s["chunks"][0]["tokens"][1]]
    assert len(gen) == 2 and all(c["query_tokens"] == [c["tokens"][0] - cs, c["tokens"][0]] for c in gen)


def greedy_by_full_forward(model, prompt: list[int], n: int, memories_of=None) -> list[int]:
    """Greedy tokens recomputed with a whole forward per step (no KV cache): chunk c of the
    context reads memories_of(c) (memories, mask), or zero memories behind the sink when
    memories_of is "sink", or none at all (plain) when None."""
    cs = model.config.mem_chunk_size
    ctx = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            C = -(-len(ctx) // cs)
            if memories_of is None:
                mem = ()
            elif memories_of == "sink":
                mem = no_memories(model.config, 1, C)
            else:
                got = [memories_of(c) for c in range(C)]
                mem = (torch.stack([m for m, _ in got])[None], torch.stack([k for _, k in got])[None])
            ctx.append(int(model(torch.tensor([ctx]), *mem)[0, -1].argmax()))
    return ctx[len(prompt) :]


def test_what_memory_mode_reads_reaches_the_greedy_tokens(bank, inf):
    """Each chunk's recorded references, read by a whole forward, give exactly the generated
    tokens; and the memories change them (against none, same weights): ignoring the memories
    (or reading others than recorded) fails here."""
    cfg, _ = bank
    cs = inf.model.config.mem_chunk_size
    prompts = [r["token_ids"][:cs] for r in ref_rows(cfg) if len(r["token_ids"]) >= cs][:4]
    n_new = 3 * cs  # the prompt is one chunk: generated chunks sit on the grid of a whole forward
    r = inf.memory_retriever()
    with_memory = inf.generate_tokens(prompts, "memory", max_new_tokens=n_new, stop_at_eos=False)
    without = inf.generate_tokens(prompts, "none", max_new_tokens=n_new, stop_at_eos=False)
    assert any(a.tokens != b.tokens for a, b in zip(with_memory, without))
    for prompt, out in zip(prompts, with_memory):
        by_start = {c.start: c.ref_ids for c in out.reads}
        assert sorted(by_start) == [0, cs, 2 * cs, 3 * cs]
        assert by_start[cs] == by_start[0]  # the first generated chunk inherits the prompt's

        def memories_of(c, by_start=by_start):
            mems, mask = r.memories([by_start[c * cs]])
            return mems[0], mask[0]

        assert greedy_by_full_forward(inf.model, prompt, n_new, memories_of) == out.tokens


def test_none_mode_keeps_the_sink_the_model_was_trained_with(bank, inf):
    """The model's export.json says it reads memories: without memory it runs behind the
    ref_bos sink with zero memories (its own distribution), not as a plain LM."""
    cfg, _ = bank
    assert inf.memory_reading["reads_memory"] is True
    prompts = [r["token_ids"][:20] for r in ref_rows(cfg, 4)]
    outs = inf.generate_tokens(prompts, "none", max_new_tokens=10, stop_at_eos=False)
    plain = [greedy_by_full_forward(inf.model, p, 10) for p in prompts]
    for prompt, out in zip(prompts, outs):
        assert out.tokens == greedy_by_full_forward(inf.model, prompt, 10, "sink")
    assert any(out.tokens != p for out, p in zip(outs, plain))  # the sink matters to these weights


def test_rag_batched_equals_each_prompt_alone(bank, inf):
    """RAG contexts differ in length; a batch never pads one (the model takes no padding mask)."""
    cfg, _ = bank
    prompts = [r["token_ids"][:n] for r, n in zip(ref_rows(cfg, 4), (9, 14, 20, 27))]
    contexts, _ = inf.rag_contexts(prompts)
    assert len({len(c) for c in contexts}) > 1
    batched = inf.generate_tokens(prompts, "rag", max_new_tokens=8, batch_size=4, stop_at_eos=False)
    for p, b in zip(prompts, batched):
        assert inf.generate_tokens([p], "rag", max_new_tokens=8, batch_size=1, stop_at_eos=False)[0].tokens == b.tokens


def test_cli_build_generates_from_the_pinned_build(edited_facts_bank, tmp_path):
    """`m3 generate --build -1` reads the build before live: where an edited entity's
    description is read, live gives the edited text and --build -1 the text before the edit
    (tests/conftest.py edited_facts_bank: build 2 edits build 1's facts)."""
    from tests.conftest import FACTS

    def holds(text: str, value: str) -> bool:
        return re.search(rf"(?<!\w){re.escape(value)}(?!\w)", text) is not None

    eb = edited_facts_bank
    sets = sum((["--set", o] for o in eb.sets2), [])
    ids = {e["id"] for e in eb.edits}
    about = [json.loads(line) for line in (FACTS / "probe.jsonl").read_text().splitlines()]
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps(p["prompt"]) + "\n" for p in about if ids & set(p["source_ids"])))
    texts = {}
    for build in ("live", "-1"):
        dst = tmp_path / f"{build}.jsonl"
        assert (
            main(
                [
                    "generate",
                    "-c",
                    "configs/facts.yaml",
                    *sets,
                    "--prompts",
                    str(prompts),
                    "--build",
                    build,
                    "--max-new-tokens",
                    "4",
                    "--temperature",
                    "0",
                    "--output",
                    str(dst),
                ]
            )
            == 0
        )
        rows = [json.loads(line) for line in dst.read_text().splitlines()]
        texts[build] = {r["ref_id"]: r["text"] for row in rows for c in row["chunks"] for r in c["refs"]}
    moved = [r for r in texts["live"].keys() & texts["-1"].keys() if texts["live"][r] != texts["-1"][r]]
    assert moved, "no edited description was read on both builds"
    for r in moved:  # each one an edit: the new value live, the old one pinned
        assert any(holds(texts["live"][r], e["new"]) and holds(texts["-1"][r], e["old"]) for e in eb.edits)
    assert main(["generate", "-c", "configs/facts.yaml", *sets, "x", "--build", "7"]) == 2


def test_after_a_new_model_re_encodes_the_bank_the_old_build_is_still_read_by_the_old_model(
    edited_facts_bank, tmp_path
):
    """A build pins table versions, not weights: its memories name the model that wrote them.
    After a newly trained continual model re-encodes the bank (build 3), live is served by it
    and build 2 (`--build -1`) by the first model, not by the newest trained one whose
    memories it is not; with the first one gone, one error naming its hash."""
    eb = edited_facts_bank
    shutil.copytree(eb.root / "bank", tmp_path / "bank")  # the session's bank stays as it is
    # no encode.checkpoint: the bank's newest trained model encodes it (jobs/models.py)
    cfg = eb.config(eb.cfg2.corpus.paths[0], f"bank.uri={tmp_path / 'bank'}")
    torch.manual_seed(1)
    other = save_model(Memory3(dataclasses.replace(cfg.model, init_std=0.2)), Bank.of(cfg).trained_model("continual"))
    write_export(cfg, other)
    summary = run_rebuild(cfg)
    assert summary["status"] == "published" and summary["memories"]["unchanged"] == 0  # every memory re-encoded
    first = saved_hash(eb.ckpt)
    assert Inference(cfg).model_hash == saved_hash(other) != first
    for build in (-1, 2, 1):
        inf = Inference(cfg, build=build)
        assert (inf.checkpoint, inf.model_hash) == (eb.ckpt, first)
        inf.store()  # the store accepts the pinned build's memories: they were written by this model
    moved = tmp_path / "moved"
    eb.ckpt.rename(moved)
    try:
        with pytest.raises(BankError, match=rf"build 2's memories were written by model {first[:12]} .*not on disk"):
            Inference(cfg, build=-1)
    finally:
        moved.rename(eb.ckpt)
