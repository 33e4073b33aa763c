"""Retrieval at inference: token queries -> the bank's memories, batched, leakage-filtered.

One call serves every query of a swap point (all rows of a batch, or all prompt chunks of all
rows): one embedder call, one vector search, one read of the candidates' tokens (only when the
overlap filter is on), one MemoryStore.fetch through its RAM cache. Never a call per row, except
BM25's (`retrieval.method` bm25 or hybrid: LanceDB's full-text search answers one query a call,
~3-10 ms each; storage/lexical.py `retrieve`, the ranking the pair stage used).

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
import threading
import time
from collections import Counter, OrderedDict
from typing import Sequence

import numpy as np
import torch

from model.generation import Retrieved
from pipelines.overlap import overlap_exceeds_rows
from storage.bank import Bank, BankError, tokens_of
from storage.lexical import require_fts, retrieve
from storage.memory_store import MemoryStore
from storage.vector_matrix import DEFAULT_MAX_BYTES, VectorMatrix
from storage.vectors import search, search_params

# References whose tokens (int32) and document stay in RAM: ~0.5 KB each at 128 tokens, so the
# default is ~32 MB, the demo bank three times over. Serving hits the same popular references
# again and again; each miss costs a filtered scan of `refs`.
DEFAULT_TOKEN_CACHE = 65_536


class BankRetriever:
    def __init__(
        self,
        bank: Bank,
        embedder,
        tokenizer,
        *,
        per_query: int,
        store: MemoryStore | None = None,
        max_overlap: float | None = 2 / 3,
        candidates: int = 10,
        exact: bool = False,
        ram_search_bytes: int = DEFAULT_MAX_BYTES,
        token_cache: int = DEFAULT_TOKEN_CACHE,
        method: str = "vector",
    ):
        """ram_search_bytes: an embeddings table whose float32 vectors fit in this many bytes is
        searched exactly in RAM (storage/vector_matrix.py, loaded at the first search), a larger
        one through LanceDB (its ANN index unless `exact`); 0 = always LanceDB. token_cache:
        references whose tokens are kept between calls (0 = none). method: `retrieval.method`
        (bm25 and hybrid search the full-text index of the bank's embeddings version)."""
        bank.require("embeddings", "refs")
        embedder.check_lineage(bank.metadata("embeddings")["embedder"])
        self.bank, self.embedder, self.tokenizer, self.store = bank, embedder, tokenizer, store
        self.per_query, self.max_overlap, self.exact = per_query, max_overlap, exact
        self.candidates = max(candidates, per_query)
        self.table = bank.table("embeddings")
        self.method = method
        require_fts(self.table, method)  # now, not at the first query
        self.params = None if exact else search_params(self.table)  # looked up once, not per call
        self.refs = bank.dataset("refs")
        self.ref_docs: dict[str, str] = {}  # ref_id -> doc_id, of every reference looked up
        self.ram_search_bytes, self.token_cache = ram_search_bytes, token_cache
        # shared by the copies of with_filter/with_store; the prefetch thread searches too
        self._shared = {"matrix": None, "tokens": OrderedDict(), "lock": threading.Lock()}
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

    def search_ids(
        self,
        queries: Sequence[Sequence[int]],
        contexts: Sequence[Sequence[int]] | None = None,
        exclude_docs: Sequence[set[str]] | None = None,
    ) -> list[list[str]]:
        """The per_query best reference ids for each token query, after the overlap filter
        (against contexts[i], else the query) and without references of exclude_docs[i]."""
        if not queries:
            return []
        t0 = time.perf_counter()
        texts = [self.tokenizer.decode([int(t) for t in q]) for q in queries]
        td, embedding = time.perf_counter(), [0.0]

        def dense(texts: list[str], k: int) -> list[list[tuple[str, float]]]:
            t = time.perf_counter()
            self.counts["embed"] += 1
            vectors = self.embedder.embed(texts)
            embedding[0] += time.perf_counter() - t
            matrix = self.matrix()
            if matrix is not None:
                return matrix.search(vectors, k=k)
            return search(self.table, vectors, k=k, exact=self.exact, params=self.params)

        self.counts["search"] += 1
        hits = retrieve(self.method, texts, self.candidates, table=self.table, vector_hits=dense)
        t2 = time.perf_counter()
        t1 = td + embedding[0]  # "embed": decoding and embedding the queries, as before
        self.seconds["embed"] += t1 - t0
        self.seconds["search"] += t2 - t1
        ids = [[rid for rid, _ in h] for h in hits]
        if exclude_docs is not None:
            self._token_arrays({r for row in ids for r in row})  # learns their documents
            ids = [[r for r in row if self.ref_docs[r] not in docs] for row, docs in zip(ids, exclude_docs)]
        if self.max_overlap is None:
            return [row[: self.per_query] for row in ids]
        tokens = self._token_arrays({r for row in ids for r in row})
        against = contexts if contexts is not None else queries
        # every (text, candidate) pair of the swap point at once; only the verdict is needed,
        # so most pairs are settled by a bound without combing (pipelines/overlap.py)
        drop = overlap_exceeds_rows(
            [np.asarray(t, dtype=np.int64) for t in against],
            [[tokens[r] for r in row] for row in ids],
            self.max_overlap,
        )
        out = [[r for r, d in zip(row, dr) if not d][: self.per_query] for row, dr in zip(ids, drop)]
        self.seconds["filter"] += time.perf_counter() - t2
        return out

    def matrix(self) -> VectorMatrix | None:
        """The embeddings in RAM when they fit under ram_search_bytes (loaded once), else None."""
        shared = self._shared
        if shared["matrix"] is None:
            with shared["lock"]:
                if shared["matrix"] is None:
                    small = self.ram_search_bytes > 0 and VectorMatrix.nbytes(self.table) <= self.ram_search_bytes
                    shared["matrix"] = VectorMatrix.load(self.table, self.ram_search_bytes) if small else False
        return shared["matrix"] or None

    def _token_arrays(self, ref_ids) -> dict[str, np.ndarray]:
        """Token ids (int32 arrays) of the given references: from the cache, the misses in one
        filtered scan of `refs`; learns their documents (ref_docs)."""
        cache = self._shared["tokens"]
        out, missing = {}, []
        with self._shared["lock"]:
            for r in set(ref_ids):
                if r in cache:
                    cache.move_to_end(r)
                    out[r] = cache[r]
                else:
                    missing.append(r)
        if not missing:
            return out
        self.counts["refs"] += 1
        got, docs = tokens_of(self.refs, missing, with_docs=True)
        if len(got) != len(missing):
            absent = sorted(set(missing) - set(got))[0]
            raise BankError(
                f"the embeddings name reference {absent!r}, absent from refs: the tables "
                f"are from different builds (rerun `m3 embed`)"
            )
        with self._shared["lock"]:
            self.ref_docs.update(docs)
            for r, t in got.items():
                out[r] = np.asarray(t, dtype=np.int32)
                if self.token_cache > 0:
                    cache[r] = out[r]
            while len(cache) > self.token_cache:
                cache.popitem(last=False)
        return out

    def clear_cache(self) -> None:
        """Forget the cached reference tokens (bench/decode.py's cold rows)."""
        with self._shared["lock"]:
            self._shared["tokens"].clear()

    def ref_tokens(self, ref_ids) -> dict[str, list[int]]:
        """Token ids of the given references (through the cache; misses in one scan)."""
        return {r: t.tolist() for r, t in self._token_arrays(ref_ids).items()}

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
        if len(flat) == N * M:  # every row full (the usual case): the fetched batch, reshaped
            return mems.reshape(N, M, *shape), masks.reshape(N, M, shape[3])
        # some rows short: one scatter into empty slots (bf16 payloads stay bf16 to the model)
        slot = torch.tensor([n * M + j for n, row in enumerate(id_lists) for j in range(len(row))], dtype=torch.long)
        out = torch.zeros(N * M, *shape, dtype=mems.dtype)
        valid = torch.zeros(N * M, shape[3], dtype=torch.bool)
        out[slot] = mems
        valid[slot] = masks
        return out.reshape(N, M, *shape), valid.reshape(N, M, shape[3])

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
            batch = missing[lo : lo + self.batch_size]
            rows = [tokens[r] for r in batch]
            width = max(len(t) for t in rows)
            ids = torch.tensor([t + [self.model.config.pad_id] * (width - len(t)) for t in rows], device=device)
            enc = self.model.encode_references(ids, top_k=self.top_k)
            kv, mask = through_codec(enc.kv.float().cpu(), self.codec), enc.mask.cpu()
            for i, r in enumerate(batch):
                self.cache[r] = (kv[i], mask[i])
        if not ref_ids:
            return torch.zeros((0, *self.shape)), torch.zeros((0, self.top_k), dtype=torch.bool)
        return (torch.stack([self.cache[r][0] for r in ref_ids]), torch.stack([self.cache[r][1] for r in ref_ids]))


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
