"""Scheduled generation (model/generation.py): which memories each position can see, one
retriever call per swap point for the whole batch, prefetch changing nothing, batched equal to
single-prompt generation, and sampling."""

import pytest
import torch

from model.generation import Retrieved, generate_with_memory, visible_refs
from model.sampling import row_generators, sample, top_p_filter

from .helpers import make_model, random_memories, random_tokens


class QueryKeyedRetriever:
    """Memories that are a pure function of the query tokens, named after them, so a test can
    tell from a chunk's memories which query retrieved them. Counts calls and queries."""

    def __init__(self, cfg, M=2, k=3):
        self.cfg, self.M, self.k = cfg, M, k
        self.calls: list[int] = []

    def one(self, query: torch.Tensor):
        key = hash(tuple(query.tolist())) % 2**31
        mem, mask = random_memories(torch.Generator().manual_seed(key), self.cfg, 1, 1, self.M, self.k)
        return mem[0, 0], mask[0, 0], [f"q{key}-{i}" for i in range(self.M)]

    def __call__(self, queries, contexts):
        assert len(queries) == len(contexts)
        self.calls.append(len(queries))
        got = [self.one(q) for q in queries]
        return Retrieved(torch.stack([g[0] for g in got]), torch.stack([g[1] for g in got]), [g[2] for g in got])


def test_schedule_prompt_chunks_own_query_then_inherit_then_previous_chunk():
    model = make_model()
    cs = model.config.mem_chunk_size  # 16 in the tiny preset
    gen = torch.Generator().manual_seed(1)
    T0, n = 2 * cs + 5, 3 * cs + 2  # a prompt that does not end on a chunk boundary
    prompt = random_tokens(gen, model.config, 2, T0)
    r = QueryKeyedRetriever(model.config)
    out = generate_with_memory(model, prompt, n, r)
    toks = out.tokens
    # one call for all prompt chunks of all rows, then one per swap (generated chunks 1, 2, 3)
    assert r.calls == [2 * 3, 2, 2, 2]
    for b in range(2):
        reads = out.reads[b]
        spans = [(x.start, x.end, x.query_start, x.query_end) for x in reads]
        assert spans == [
            (0, cs, 0, cs),
            (cs, 2 * cs, cs, 2 * cs),
            (2 * cs, T0, 2 * cs, T0),
            (T0, T0 + cs, 2 * cs, T0),  # inherits the last prompt chunk
            (T0 + cs, T0 + 2 * cs, T0, T0 + cs),
            (T0 + 2 * cs, T0 + 3 * cs, T0 + cs, T0 + 2 * cs),
            (T0 + 3 * cs, T0 + n, T0 + 2 * cs, T0 + 3 * cs),
        ]
        for x in reads:  # the recorded ids are those of the recorded query's memories
            assert x.ref_ids == r.one(toks[b, x.query_start : x.query_end])[2]
        assert visible_refs(reads, T0 + cs) == reads[4].ref_ids
        assert visible_refs(reads, T0 - 1) == visible_refs(reads, T0) == reads[2].ref_ids


@pytest.mark.parametrize("M, k", [(2, 3), (3, 4)])  # in the cache's memory region; too large for it
def test_prompt_on_chunk_boundary_equals_full_forward_everywhere(M, k):
    """Greedy tokens equal recomputing the whole sequence at every step, each chunk given the
    memories of the query its record names: the cache swaps match the paper's masking. (With
    T0 a multiple of cs every forward chunk reads exactly one record; other prompt lengths are
    covered by the swap tests of test_decode.py and the schedule test above.)"""
    model = make_model()
    cs = model.config.mem_chunk_size
    gen = torch.Generator().manual_seed(3)
    prompt = random_tokens(gen, model.config, 1, 2 * cs)
    r = QueryKeyedRetriever(model.config, M, k)
    out = generate_with_memory(model, prompt, 2 * cs + 3, r)
    seq = out.tokens
    checked = 0
    for t in range(prompt.shape[1], seq.shape[1]):
        blocks = [next(x for x in out.reads[0] if x.start <= c * cs < x.end) for c in range(-(-t // cs))]
        mems = [r.one(seq[0, rd.query_start : rd.query_end]) for rd in blocks]
        with torch.no_grad():
            logits = model(seq[:, :t], torch.stack([x[0] for x in mems])[None], torch.stack([x[1] for x in mems])[None])
        assert logits[0, -1].argmax() == seq[0, t]
        checked += 1
    assert checked == 2 * cs + 3


def test_prefetch_changes_nothing():
    model = make_model()
    cs = model.config.mem_chunk_size
    prompt = random_tokens(torch.Generator().manual_seed(4), model.config, 3, cs)
    a = generate_with_memory(model, prompt, 3 * cs + 1, QueryKeyedRetriever(model.config))
    r = QueryKeyedRetriever(model.config)
    b = generate_with_memory(model, prompt, 3 * cs + 1, r, prefetch=True)
    assert torch.equal(a.tokens, b.tokens)
    assert [[vars(x) for x in row] for row in a.reads] == [[vars(x) for x in row] for row in b.reads]
    assert r.calls == [3, 3, 3]  # the swap at 3*cs would feed no token: never retrieved


@pytest.mark.parametrize("temperature", [0.0, 0.9])
@pytest.mark.parametrize("with_memory", [False, True])
def test_batched_equals_single_prompt_generation(temperature, with_memory):
    model = make_model()
    cs = model.config.mem_chunk_size
    prompts = random_tokens(torch.Generator().manual_seed(5), model.config, 4, cs + 7)
    seeds = [11, 12, 13, 14]

    def run(p, s):
        r = QueryKeyedRetriever(model.config) if with_memory else None
        return generate_with_memory(
            model, p, 2 * cs + 5, r, temperature=temperature, top_p=0.9, generators=row_generators(s)
        )

    batched = run(prompts, seeds)
    for i in range(4):
        single = run(prompts[i : i + 1], seeds[i : i + 1])
        assert torch.equal(single.tokens[0], batched.tokens[i])
        assert [vars(x) for x in single.reads[0]] == [vars(x) for x in batched.reads[i]]


def test_stops_when_every_row_has_produced_eos():
    model = make_model()
    prompt = random_tokens(torch.Generator().manual_seed(6), model.config, 1, 5)
    first = generate_with_memory(model, prompt, 1).tokens[0, -1].item()
    out = generate_with_memory(model, prompt, 40, eos_id=first)  # greedy: stops at once
    assert out.tokens.shape[1] == 6


def test_top_p_keeps_the_smallest_nucleus_and_sampling_stays_inside_it():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    kept = top_p_filter(logits, 0.7).isfinite()[0].tolist()
    assert kept == [True, True, False, False]
    assert top_p_filter(logits, 0.5).isfinite()[0].tolist() == [True, False, False, False]
    gens = row_generators([0])
    picks = {sample(logits, 1.0, 0.7, gens).item() for _ in range(200)}
    assert picks == {0, 1}
    assert sample(logits, 0.0).item() == 0
    with pytest.raises(ValueError, match="top_p"):
        sample(logits, 1.0, 0.0)
