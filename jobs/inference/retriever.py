"""Retrieval at inference: token queries -> the bank's memories, batched, leakage-filtered.

One call serves every query of a swap point (all rows of a batch, or all prompt chunks of all
rows): one embedder call, one vector search, one read of the candidates' tokens (only when the
overlap filter is on), one MemoryStore.fetch through its RAM cache. Never a call per row.

The overlap filter [paper §4.4]: a candidate whose eq. 6 overlap with the text it serves exceeds
max_overlap is dropped, and the best mems_per_chunk survivors are kept; a query left with fewer
gets empty slots (mask False), which attention ignores. Evaluation also drops the references of
the scored text's own documents (`exclude_docs`): the bank holds held-out text verbatim.

Where the memories come from is the store: the bank's `MemoryStore` (what serving reads), or an
`EncodingStore` that encodes the retrieved references with a model on the fly, at any sparsity
and through any codec (the training-time evidence, and the dense control of `m3 eval`).
"""

from __future__ import annotations

import copy
import time
from collections import Counter
from typing import Sequence

import torch

from model.generation import Retrieved
from pipelines.overlap import overlap_many
from storage.bank import Bank, BankError, tokens_of
from storage.memory_store import MemoryStore
from storage.vectors import search, search_params


class BankRetriever:
    def __init__(self, bank: Bank, embedder, tokenizer, *, per_query: int, store: MemoryStore | None = None,
                 max_overlap: float | None = 2 / 3, candidates: int = 10, exact: bool = False):
        bank.require("embeddings", "refs")
        embedder.check_lineage(bank.metadata("embeddings")["embedder"])
        self.bank, self.embedder, self.tokenizer, self.store = bank, embedder, tokenizer, store
        self.per_query, self.max_overlap, self.exact = per_query, max_overlap, exact
        self.candidates = max(candidates, per_query)
        self.table = bank.table("embeddings")
        self.params = None if exact else search_params(self.table)  # looked up once, not per call
        self.refs = bank.dataset("refs")
        self.ref_docs: dict[str, str] = {}  # ref_id -> doc_id, of every reference looked up
        self.counts: Counter = Counter()  # calls of each step, for tests and the benchmark
        self.seconds: Counter = Counter()  # wall time of each step, for the benchmark

    def with_filter(self, max_overlap: float | None) -> "BankRetriever":
        """The same retriever (same tables, store, cache, counters) with another threshold."""
        other = copy.copy(self)
        other.max_overlap = max_overlap
        return other

    def with_store(self, store) -> "BankRetriever":
        """The same retriever reading memories from another store (an EncodingStore)."""
        other = copy.copy(self)
        other.store = store
        return other

    def search_ids(self, queries: Sequence[Sequence[int]], contexts: Sequence[Sequence[int]] | None = None,
                   exclude_docs: Sequence[set[str]] | None = None) -> list[list[str]]:
        """The per_query best reference ids for each token query, after the overlap filter
        (against contexts[i], else the query) and without references of exclude_docs[i]."""
        if not queries:
            return []
        t0 = time.perf_counter()
        texts = [self.tokenizer.decode([int(t) for t in q]) for q in queries]
        self.counts["embed"] += 1
        vectors = self.embedder.embed(texts)
        t1 = time.perf_counter()
        self.counts["search"] += 1
        hits = search(self.table, vectors, k=self.candidates, exact=self.exact, params=self.params)
        t2 = time.perf_counter()
        self.seconds["embed"] += t1 - t0
        self.seconds["search"] += t2 - t1
        ids = [[rid for rid, _ in h] for h in hits]
        if exclude_docs is not None:
            self.ref_tokens({r for row in ids for r in row})  # learns their documents
            ids = [[r for r in row if self.ref_docs[r] not in docs] for row, docs in zip(ids, exclude_docs)]
        if self.max_overlap is None:
            return [row[:self.per_query] for row in ids]
        tokens = self.ref_tokens({r for row in ids for r in row})
        against = contexts if contexts is not None else queries
        out = []
        for row, text in zip(ids, against):
            text = [int(t) for t in text]
            over = overlap_many(text, [tokens[r] for r in row]) if row else []
            out.append([r for r, o in zip(row, over) if o <= self.max_overlap][:self.per_query])
        self.seconds["filter"] += time.perf_counter() - t2
        return out

    def ref_tokens(self, ref_ids) -> dict[str, list[int]]:
        """Token ids of the given references, in one filtered scan of `refs`."""
        ref_ids = sorted(set(ref_ids))
        if not ref_ids:
            return {}
        self.counts["refs"] += 1
        got, docs = tokens_of(self.refs, ref_ids, with_docs=True)
        self.ref_docs.update(docs)
        if len(got) != len(ref_ids):
            missing = sorted(set(ref_ids) - set(got))[0]
            raise BankError(f"the embeddings name reference {missing!r}, absent from refs: the tables "
                            f"are from different builds (rerun `m3 embed`)")
        return got

    def memories(self, id_lists: list[list[str]]) -> tuple[torch.Tensor, torch.Tensor]:
        """(N, per_query, ...) memories and (N, per_query, k) masks, in one fetch; empty slots
        where a query has fewer references."""
        if self.store is None:
            raise BankError("this retriever was built without a MemoryStore (modes none/rag)")
        flat = [r for row in id_lists for r in row]
        self.counts["fetch"] += 1
        t0 = time.perf_counter()
        mems, masks = self.store.fetch(flat)
        self.seconds["fetch"] += time.perf_counter() - t0
        shape = self.store.shape  # (L, 2, H, k, D)
        N, M = len(id_lists), self.per_query
        out = torch.zeros(N, M, *shape, dtype=mems.dtype)  # bf16 payloads stay bf16 to the model
        valid = torch.zeros(N, M, shape[3], dtype=torch.bool)
        i = 0
        for n, row in enumerate(id_lists):
            out[n, :len(row)] = mems[i:i + len(row)]
            valid[n, :len(row)] = masks[i:i + len(row)]
            i += len(row)
        return out, valid

    def __call__(self, queries: list[torch.Tensor], contexts: list[torch.Tensor]) -> Retrieved:
        """The model.generation.BatchRetriever interface."""
        ids = self.search_ids([q.tolist() for q in queries], [c.tolist() for c in contexts])
        mems, mask = self.memories(ids)
        return Retrieved(mems, mask, ids)


class EncodingStore:
    """A MemoryStore look-alike that encodes references with `model` when they are fetched:
    top_k tokens per memory layer and KV head (None = every token: dense), then through `codec`
    (None = raw float32). With the model's mem_top_k and the bank's codec this returns what
    `m3 encode` would store, before the bank is encoded (training's evidence); with top_k None
    and no codec it is the dense control the served bank is measured against."""

    def __init__(self, model, token_source, top_k: int | None = None, codec=None, batch_size: int = 64):
        cfg = model.config
        self.model, self.tokens_of, self.codec, self.batch_size = model, token_source, codec, batch_size
        self.top_k = top_k or cfg.ref_max_tokens
        self.shape = (cfg.n_mem_layers, 2, cfg.n_kv_heads, self.top_k, cfg.head_dim)
        self.cache: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.hits = self.misses = 0

    @torch.no_grad()
    def fetch(self, ref_ids: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        from model.train_step import through_codec

        missing = [r for r in dict.fromkeys(ref_ids) if r not in self.cache]
        self.hits += len(ref_ids) - len(missing)
        self.misses += len(missing)
        tokens = self.tokens_of(missing) if missing else {}
        device = next(self.model.parameters()).device
        for lo in range(0, len(missing), self.batch_size):
            batch = missing[lo:lo + self.batch_size]
            rows = [tokens[r] for r in batch]
            width = max(len(t) for t in rows)
            ids = torch.tensor([t + [self.model.config.pad_id] * (width - len(t)) for t in rows], device=device)
            enc = self.model.encode_references(ids, top_k=self.top_k)
            kv, mask = through_codec(enc.kv.float().cpu(), self.codec), enc.mask.cpu()
            for i, r in enumerate(batch):
                self.cache[r] = (kv[i], mask[i])
        if not ref_ids:
            return torch.zeros((0, *self.shape)), torch.zeros((0, self.top_k), dtype=torch.bool)
        return (torch.stack([self.cache[r][0] for r in ref_ids]),
                torch.stack([self.cache[r][1] for r in ref_ids]))


class CodedStore:
    """Another store's memories as `codec` returns them after storing them (encode, decode): the
    same references at several codecs without encoding them again (bench/memory_gain.py)."""

    def __init__(self, base, codec):
        self.base, self.codec, self.shape = base, codec, base.shape
        self.cache: dict[str, torch.Tensor] = {}
        self.hits = self.misses = 0

    def fetch(self, ref_ids: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        mems, mask = self.base.fetch(ref_ids)
        missing = [i for i, r in enumerate(ref_ids) if r not in self.cache]
        if missing:
            coded = self.codec.round_trip(mems[missing])
            for j, i in enumerate(missing):
                self.cache[ref_ids[i]] = coded[j]
        return (torch.stack([self.cache[r] for r in ref_ids]) if len(ref_ids) else mems), mask
