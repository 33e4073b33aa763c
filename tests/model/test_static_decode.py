"""The fixed-shape decode step (model/static_decode.py) against Memory3.forward on a KVCache:
same logits to rounding at every step, the same greedy tokens through generate_with_memory with
memory swaps at chunk boundaries, without memory and behind the sink alone, and a reused decoder
reading nothing of the batch before. On CPU the step runs eagerly; the CUDA graph replays it."""

import pytest
import torch

from model import KVCache
from model.generation import generate_with_memory
from model.static_decode import StaticDecoder

from .helpers import make_model, random_memories, random_tokens
from .test_generation import QueryKeyedRetriever


@pytest.fixture(autouse=True)
def one_thread():
    """A tiny model's matmuls gain nothing from a second thread, and on cores shared with other
    jobs a waiting OpenMP team stretched these tests from seconds to minutes."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("with_memory", [False, True])
def test_every_step_gives_the_logits_of_the_eager_step(with_memory):
    """Token by token over three chunks, a swap at each chunk boundary (front region refilled in
    place, with invalid slots), checked at every step."""
    model = make_model()
    cfg = model.config
    cs = cfg.mem_chunk_size
    gen = torch.Generator().manual_seed(30)
    T0, T = 5, 3 * cs + 3
    tokens = random_tokens(gen, cfg, 2, T)
    memories, mask = random_memories(gen, cfg, 2, 4, 2, 3, p_valid=0.6)
    eager = KVCache(model, 2, T, with_memory=with_memory)
    static = StaticDecoder(model, 2, T, with_memory=with_memory)
    assert not static.graph  # CPU: the same step, eagerly
    prefill = dict(memories=memories[:, :1], mem_mask=mask[:, :1]) if with_memory else {}
    with torch.no_grad():
        a = model(tokens[:, :T0], cache=eager, **prefill)
        b = model(tokens[:, :T0], cache=static.cache, **prefill)
        assert torch.equal(a, b)
        for t in range(T0, T):
            if with_memory and t % cs == 0:
                for cache in (eager, static.cache):
                    cache.swap_memories(memories[:, t // cs], mask[:, t // cs])
            want = model(tokens[:, t : t + 1], cache=eager)
            got = static(tokens[:, t : t + 1])
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert static.cache.length == eager.length


@pytest.mark.parametrize("mode", ["memory", "none", "sink"])
def test_greedy_generation_equals_the_eager_path(mode):
    """The whole schedule: prompt chunks' own memories, the inherited block, a swap every cs
    generated tokens (three here), same retriever calls; and decoding without memories."""
    model = make_model()
    cfg = model.config
    cs = cfg.mem_chunk_size
    gen = torch.Generator().manual_seed(31)
    prompt = random_tokens(gen, cfg, 3, cs + 7)
    n = 3 * cs + 4
    kw = {"retrieve": QueryKeyedRetriever(cfg)} if mode == "memory" else {"sink": mode == "sink"}
    eager = generate_with_memory(model, prompt, n, **kw)
    if mode == "memory":
        kw["retrieve"] = QueryKeyedRetriever(cfg)
    static = generate_with_memory(model, prompt, n, static=True, **kw)
    assert torch.equal(static.tokens, eager.tokens)
    assert [[r.ref_ids for r in row] for row in static.reads] == [[r.ref_ids for r in row] for row in eager.reads]
    if mode == "memory":
        assert kw["retrieve"].calls == [3 * 2, 3, 3, 3]


def test_a_reused_decoder_reads_nothing_of_the_batch_before():
    """One decoder for two batches, the first longer (its slots stay behind, stale): the second
    batch's tokens equal a fresh eager run's."""
    model = make_model()
    cfg = model.config
    gen = torch.Generator().manual_seed(32)
    first, second = random_tokens(gen, cfg, 2, 20), random_tokens(gen, cfg, 2, 9)
    r = QueryKeyedRetriever(cfg)
    decoder = StaticDecoder(model, 2, 20 + 30, with_memory=True)
    generate_with_memory(model, first, 30, r, static=decoder)
    again = generate_with_memory(model, second, 25, r, static=decoder)
    assert torch.equal(again.tokens, generate_with_memory(model, second, 25, r).tokens)


def test_misuse_raises_clear_errors():
    model = make_model()
    cfg = model.config
    gen = torch.Generator().manual_seed(33)
    prompt = random_tokens(gen, cfg, 2, 5)
    with pytest.raises(ValueError, match="CUDA graphs need a CUDA device"):
        StaticDecoder(model, 2, 10, with_memory=False, graph=True)
    decoder = StaticDecoder(model, 2, 8, with_memory=True)
    with pytest.raises(ValueError, match="prefill"):
        decoder(prompt[:, :1])
    with pytest.raises(ValueError, match="does not fit"):
        generate_with_memory(model, prompt, 10, sink=True, static=decoder)  # 15 slots > 8
    with pytest.raises(ValueError, match="does not fit"):
        generate_with_memory(model, prompt, 3, static=decoder)  # no memory, a memory decoder
    big, big_mask = random_memories(gen, cfg, 2, 1, 3, 4)  # 12 entries > the 8-slot region
    with torch.no_grad():
        model(prompt, big, big_mask, cache=decoder.reset())
        with pytest.raises(ValueError, match="does not fit"):
            decoder(prompt[:, :1])
        decoder.reset()
        model(prompt, cache=decoder.cache)
        for _ in range(3):
            decoder(prompt[:, :1])
        with pytest.raises(ValueError, match="cache full"):
            decoder(prompt[:, :1])


class FakeGraph:
    """Stands in for torch.cuda.CUDAGraph on CPU: replay reruns the step into the one output
    buffer the capture returned, as a real graph writes its outputs in place. What it checks is
    the decoder's and the caller's side: one capture, and nobody keeping the previous step's
    logits (a replay overwrites them)."""

    captures = 0

    def __init__(self):
        self.decoder = None

    def replay(self):
        self.decoder._logits.copy_(self.decoder._step())


def test_graph_path_captures_once_and_generation_reads_each_replay_before_the_next(monkeypatch):
    from contextlib import nullcontext

    model = make_model()
    cfg = model.config
    decoder = StaticDecoder(model, 2, 60, with_memory=True)
    decoder.graph = True  # the CUDA calls below are fakes

    def graph(g):
        FakeGraph.captures += 1
        g.decoder = decoder
        return nullcontext()

    class Stream:
        def wait_stream(self, other):
            pass

    monkeypatch.setattr(torch.cuda, "Stream", Stream)
    monkeypatch.setattr(torch.cuda, "current_stream", Stream)
    monkeypatch.setattr(torch.cuda, "stream", lambda s: nullcontext())
    monkeypatch.setattr(torch.cuda, "graph", graph)
    monkeypatch.setattr(torch.cuda, "CUDAGraph", FakeGraph)
    gen = torch.Generator().manual_seed(34)
    r = QueryKeyedRetriever(cfg)
    for T0, n in ((20, 40), (9, 35)):
        prompt = random_tokens(gen, cfg, 2, T0)
        got = generate_with_memory(model, prompt, n, r, static=decoder)
        assert torch.equal(got.tokens, generate_with_memory(model, prompt, n, r).tokens)
    assert FakeGraph.captures == 1
