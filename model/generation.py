"""Generation with explicit memory on the paper's schedule, recording what every chunk read.

Schedule [paper §3.1; docs/paper.md, "Inference schedule"], with cs = mem_chunk_size:
- prompt chunk c (context tokens [c*cs, (c+1)*cs)) retrieves with its own tokens as the query
  and attends only to its own memories; all prompt chunks are retrieved in ONE retriever call
  (every row, every chunk) and prefilled in one forward (no Python loop over chunks);
- the first cs generated tokens inherit the last prompt chunk's memories;
- generated chunk j >= 1 retrieves with generated chunk j-1 as the query, and the memory block
  of the KV cache is swapped without recomputing the context: one retriever call per swap
  point for the whole batch.

The retriever is a callable from the caller (jobs/inference/retriever.py reads the bank); model/ knows
nothing about Lance or embedders. With prefetch, the retrieval for the next chunk starts in a
background thread as soon as its query is complete (after the chunk's last token is sampled)
and runs while that token is decoded; the swap waits for it. The result is identical either
way: the query is the same, only the waiting moves.

`score_continuation` reads a given continuation on the same schedule (teacher forcing): the
loss of each of its tokens and whether greedy decoding would produce it (`m3 eval`'s QA probes).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, NamedTuple

import torch
from torch import Tensor

from .decode import KVCache
from .sampling import sample
from .static_decode import StaticDecoder


class Retrieved(NamedTuple):
    """What a retriever returns for N queries: memories (N, M, n_mem_layers, 2, n_kv_heads, k,
    head_dim), their slot mask (N, M, k) bool (False for empty slots and missing memories), and
    the reference ids of each query's memories (for --show-memories and the tests)."""

    memories: Tensor
    mask: Tensor
    ref_ids: list[list[str]]


# retrieve(queries: N 1-D int64 token tensors, contexts: the N texts to filter leakage
# against) -> Retrieved, row i answering query i. One call = one embed + search + fetch.
BatchRetriever = Callable[[list[Tensor], list[Tensor]], Retrieved]


@dataclass
class ChunkRead:
    """One chunk of one row: context tokens [start, end) attended to the memories retrieved
    with context tokens [query_start, query_end) as the query."""

    start: int
    end: int
    query_start: int
    query_end: int
    ref_ids: list[str] = field(default_factory=list)


@dataclass
class Generated:
    tokens: Tensor  # (B, T0 + n) prompt and continuation
    reads: list[list[ChunkRead]]  # per row, chunk by chunk; [] without retrieval


def _prompt_queries(prompt: Tensor, cs: int) -> list[tuple[int, int]]:
    T0 = prompt.shape[1]
    return [(c, min(c + cs, T0)) for c in range(0, T0, cs)]


@torch.no_grad()
def generate_with_memory(
    model,
    prompt: Tensor,
    max_new_tokens: int,
    retrieve: BatchRetriever | None = None,
    *,
    temperature: float = 0.0,
    top_p: float = 1.0,
    generators: list[torch.Generator] | None = None,
    eos_id: int | None = None,
    prefetch: bool = False,
    sink: bool = False,
    static: StaticDecoder | bool = False,
    on_token: Callable[[Tensor], None] | None = None,
) -> Generated:
    """Continue prompt (B, T0) by up to max_new_tokens (all rows stop early once every row has
    produced eos_id). Without retrieve: decoding with no memories, behind the ref_bos sink when
    `sink` (a model trained to read memories is in distribution only so), else plain.

    static: decode steps of fixed shapes (model/static_decode.py; a CUDA graph on a GPU), True
    for a fresh StaticDecoder, or one to reuse (its cache is reset; its graph is kept). Same
    schedule and memories; logits equal to rounding.

    on_token: called with each step's sampled tokens (B, 1) as soon as they are sampled, before
    the next step is decoded (`m3 serve` streams them); it changes nothing in the decode."""
    cfg = model.config
    cs = cfg.mem_chunk_size
    B, T0 = prompt.shape
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    with_memory = retrieve is not None or sink
    decoder = _static_decoder(static, model, B, T0 + max_new_tokens, with_memory)
    cache = decoder.reset() if decoder else KVCache(model, B, T0 + max_new_tokens, with_memory=with_memory)
    reads: list[list[ChunkRead]] = [[] for _ in range(B)]
    memories = mem_mask = None
    if retrieve is not None:
        spans = _prompt_queries(prompt, cs)
        queries = [prompt[b, s:e] for b in range(B) for s, e in spans]
        got = _on(retrieve(queries, [prompt[b] for b in range(B) for _ in spans]), prompt.device)
        C = len(spans)
        memories = got.memories.reshape(B, C, *got.memories.shape[1:])
        mem_mask = got.mask.reshape(B, C, *got.mask.shape[1:])
        for b in range(B):
            for c, (s, e) in enumerate(spans):
                reads[b].append(ChunkRead(s, e, s, e, list(got.ref_ids[b * C + c])))
            last = reads[b][-1]  # the first generated chunk inherits the last prompt chunk's
            reads[b].append(ChunkRead(T0, T0 + cs, last.query_start, last.query_end, list(last.ref_ids)))
    logits = model(prompt, memories, mem_mask, cache=cache)
    out = [prompt]
    done = torch.zeros(B, dtype=torch.bool, device=prompt.device)
    pool = ThreadPoolExecutor(1) if prefetch and retrieve is not None else None
    pending = None
    try:
        for step in range(max_new_tokens):
            token = sample(logits[:, -1], temperature, top_p, generators)
            out.append(token)
            if on_token is not None:
                on_token(token)
            if eos_id is not None:
                done |= token[:, 0] == eos_id
            if step == max_new_tokens - 1 or bool(done.all()):
                break
            # token `step` is fed next; a swap is due before feeding a token that opens a chunk
            if retrieve is not None and step > 0 and step % cs == 0:
                got = pending.result() if pending is not None else _swap_retrieval(retrieve, out, T0, step, cs)
                got = _on(got, prompt.device)
                pending = None
                cache.swap_memories(got.memories, got.mask)
                for b in range(B):
                    reads[b].append(
                        ChunkRead(T0 + step, T0 + step + cs, T0 + step - cs, T0 + step, list(got.ref_ids[b]))
                    )
            nxt = step + 1
            if pool is not None and nxt % cs == 0 and nxt < max_new_tokens - 1:
                # the query of the swap at `nxt` is complete now: fetch it while this token decodes
                pending = pool.submit(_swap_retrieval, retrieve, list(out), T0, nxt, cs)
            logits = decoder(token) if decoder else model(token, cache=cache)
    finally:
        if pool is not None:
            pool.shutdown(wait=True)
    tokens = torch.cat(out, dim=1)
    n = tokens.shape[1]
    return Generated(tokens, [clip_reads(row, n) for row in reads])


def clip_reads(row: list[ChunkRead], end: int) -> list[ChunkRead]:
    """A row's reads as a decode whose last token fed is `end` - 1 has them: chunks that start at
    or after `end` dropped, the last one cut to it."""
    return [
        ChunkRead(c.start, min(c.end, end), c.query_start, c.query_end, list(c.ref_ids)) for c in row if c.start < end
    ]


@torch.no_grad()
def score_continuation(
    model, prompt: Tensor, continuation: Tensor, retrieve: BatchRetriever | None = None, *, sink: bool = False
) -> tuple[Tensor, Tensor, list[list[list[str]]]]:
    """Teacher-forced `continuation` (B, A) after `prompt` (B, T0), read exactly as
    generate_with_memory reads what it generates: the prompt chunks' own retrievals, the first
    cs continuation tokens on the last prompt chunk's memories, then a swap every cs tokens
    queried with the cs continuation tokens before it. Returns each continuation token's loss
    (B, A) float32, whether it is the greedy choice there (B, A) bool (all True in a row: greedy
    decoding produces the continuation), and per row the references each continuation chunk
    read (empty without retrieval)."""
    cfg = model.config
    cs = cfg.mem_chunk_size
    B, T0 = prompt.shape
    A = continuation.shape[1]
    cache = KVCache(model, B, T0 + A, with_memory=retrieve is not None or sink)
    reads: list[list[list[str]]] = [[] for _ in range(B)]
    memories = mem_mask = None
    if retrieve is not None:
        spans = _prompt_queries(prompt, cs)
        got = _on(
            retrieve(
                [prompt[b, s:e] for b in range(B) for s, e in spans], [prompt[b] for b in range(B) for _ in spans]
            ),
            prompt.device,
        )
        C = len(spans)
        memories = got.memories.reshape(B, C, *got.memories.shape[1:])
        mem_mask = got.mask.reshape(B, C, *got.mask.shape[1:])
        for b in range(B):
            reads[b].append(list(got.ref_ids[b * C + C - 1]))
    logits = [model(prompt, memories, mem_mask, cache=cache)[:, -1:]]
    fed = [prompt] + [continuation[:, j : j + 1] for j in range(A)]  # _swap_retrieval's layout
    step = 0
    while step < A - 1:  # feed continuation tokens 0 .. A-2, one chunk of the schedule at a time
        if retrieve is not None and step > 0 and step % cs == 0:
            got = _on(_swap_retrieval(retrieve, fed, T0, step, cs), prompt.device)
            cache.swap_memories(got.memories, got.mask)
            for b in range(B):
                reads[b].append(list(got.ref_ids[b]))
        end = min(A - 1, (step // cs + 1) * cs)
        logits.append(model(continuation[:, step:end], cache=cache))
        step = end
    logits = torch.cat(logits, dim=1).float()
    losses = torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), continuation.reshape(-1), reduction="none"
    ).view(B, A)
    return losses, logits.argmax(dim=-1) == continuation, reads


def _static_decoder(
    static: StaticDecoder | bool, model, B: int, n_slots: int, with_memory: bool
) -> StaticDecoder | None:
    if static is False:
        return None
    if static is True:
        return StaticDecoder(model, B, n_slots, with_memory=with_memory)
    if (
        static.model is not model
        or static.batch_size != B
        or static.max_len < n_slots
        or static.cache.with_memory != with_memory
    ):
        raise ValueError(
            f"this StaticDecoder (batch {static.batch_size}, {static.max_len} slots, "
            f"memory {static.cache.with_memory}) does not fit batch {B}, {n_slots} "
            f"slots, memory {with_memory}"
        )
    return static


def _on(got: Retrieved, device) -> Retrieved:
    """Memories come from host RAM (the store's cache); the model may live on a GPU."""
    if got.memories.device == torch.device(device):
        return got
    return Retrieved(got.memories.to(device, non_blocking=True), got.mask.to(device, non_blocking=True), got.ref_ids)


def _swap_retrieval(retrieve: BatchRetriever, out: list[Tensor], T0: int, step: int, cs: int) -> Retrieved:
    """Retrieval for the chunk opened by generated token `step`: the cs generated tokens before
    it are the query; the whole context so far is what leakage is measured against."""
    gen = torch.cat(out[1 : step + 1], dim=1)  # generated tokens 0 .. step-1
    query = gen[:, step - cs : step]
    context = torch.cat([out[0], gen], dim=1)
    return retrieve(list(query), list(context))


def visible_refs(reads: list[ChunkRead], position: int) -> list[str]:
    """The references context token `position` attended to (its chunk's memories)."""
    for r in reads:
        if r.start <= position < r.end:
            return r.ref_ids
    raise IndexError(f"position {position} is outside the generated context")
