"""The pairing stage, one shard of training sequences at a time: train_sequences rows ->
`neighbors` rows (seq_id, chunk, ref_id, score, overlap).

For every chunk_size-token chunk of a sequence: decode its text with the bank's tokenizer,
retrieve its top-k references by `retrieval.method` (storage/lexical.py `retrieve`: vector =
embed it with the bank's embedder and search `embeddings`; bm25 = the full-text index of the
table's text; hybrid = both, fused by rank), drop those whose
eq. 6 overlap with the WHOLE stored sequence exceeds max_overlap (the chunk's own text, and any
other reference the sequence contains, would teach the model to copy, not to recall) and, with
exclude_own_docs, those of the sequence's own documents; keep the best per_chunk left (rank 0
is what the paper's schedule reads, ranks 0..M-1 what the serving schedule reads). Everything
is batched: one embedder call per shard, one search per query batch, one
refs scan per shard, and one `overlap_rows` call over every (sequence, candidate) pair of the shard
(BM25 answers one query a call: LanceDB's full-text search takes no batch).

The `score` column is the method's: cosine similarity (vector), the BM25 score (bm25: > 0, on
no fixed scale) or the reciprocal-rank-fusion sum (hybrid: at most 2/61); within a chunk it
orders the ranks either way.

`pair_shard` is a plain function (tests call it without Ray); `PairShards` is the stage's shard
actor (pipelines/shard_actor.py), which loads the tokenizer, embedder and tables once.
"""

from __future__ import annotations

import pyarrow as pa

from pipelines.overlap import overlap_rows
from pipelines.shard_actor import ShardActor
from pipelines.train_data import NEIGHBORS
from storage.bank import tokens_of

# Staged rows carry one extra column: candidates of the chunk the overlap filter dropped, so the
# job's report is computed from staged files and is right after a resume too.
STAGED = NEIGHBORS.append(pa.field("dropped", pa.int32(), nullable=False))


def split_chunks(tokens, chunk_size: int) -> list[list[int]]:
    """The chunk_size-token chunks of a sequence (the last one may be shorter)."""
    tokens = list(tokens)
    return [tokens[i : i + chunk_size] for i in range(0, len(tokens), chunk_size)]


def pair_shard(
    seq_ids: list[str],
    seqs: list[list[int]],
    *,
    tokenizer,
    embedder,
    table,
    refs_ds,
    cfg,
    params=None,
    doc_ids: list[list[str]] | None = None,
    method: str = "vector",
) -> pa.Table:
    """STAGED rows for these sequences: per (seq, chunk) its best cfg.per_chunk references
    (rank 0, 1, ...), or one row with a null ref_id when none passed; in input order.

    seqs: the WHOLE stored sequences. Only the chunks of the first cfg.max_tokens are paired
    (what training reads), but leakage is measured against the whole sequence: a reference
    that straddles the edge of the trained window holds text of the sequence all the same.
    doc_ids: each sequence's documents; with cfg.exclude_own_docs their references are dropped
    too (what `m3 eval` does). tokenizer: a `tokenizers.Tokenizer`; embedder:
    pipelines.embedder.Embedder (None for method bm25); table: the LanceDB `embeddings` table;
    refs_ds: the `refs` Lance dataset; cfg: a PairConfig; params: search knobs
    (storage.vectors.search_params(table), looked up once by the caller); method:
    `retrieval.method`."""
    from storage.lexical import retrieve
    from storage.vectors import search

    chunks, owner = [], []  # owner[i] = (sequence index, chunk number) of chunks[i]
    for s, toks in enumerate(seqs):
        window = toks if cfg.max_tokens is None else toks[: cfg.max_tokens]
        for c, piece in enumerate(split_chunks(window, cfg.chunk_size)):
            chunks.append(piece)
            owner.append((s, c))
    if not chunks:
        return STAGED.empty_table()
    # special tokens (<s>, </s>) carry no meaning for the embedder
    texts = tokenizer.decode_batch(chunks, skip_special_tokens=True)

    def dense(texts: list[str], k: int) -> list[list[tuple[str, float]]]:
        vectors = embedder.embed(texts, batch_size=cfg.embed_batch_size)
        out: list[list[tuple[str, float]]] = []
        for lo in range(0, len(vectors), cfg.query_batch_size):
            out += search(table, vectors[lo : lo + cfg.query_batch_size], k=k, exact=cfg.exact, params=params)
        return out

    hits = retrieve(method, texts, cfg.k, table=table, vector_hits=dense)
    tokens, ref_doc = tokens_of(refs_ds, (rid for h in hits for rid, _ in h), with_docs=True)
    missing = {rid for h in hits for rid, _ in h} - set(tokens)
    if missing:
        raise LookupError(
            f"embeddings name {len(missing)} reference(s) absent from refs, e.g. "
            f"{sorted(missing)[0]!r}: the tables are from different builds"
        )

    # overlap of every candidate of a sequence with it: every pair of the shard in one call
    cands: list[set[str]] = [set() for _ in seqs]
    for (s, _), h in zip(owner, hits):
        cands[s].update(rid for rid, _ in h)
    ids_of = [sorted(c) for c in cands]
    ratios = overlap_rows(seqs, [[tokens[r] for r in ids] for ids in ids_of])
    per_seq = [dict(zip(ids, ov.tolist())) for ids, ov in zip(ids_of, ratios)]
    own = [set(d) for d in doc_ids] if (cfg.exclude_own_docs and doc_ids is not None) else [set() for _ in seqs]

    rows = {name: [] for name in STAGED.names}
    for i, (s, c) in enumerate(owner):
        ov = per_seq[s]
        kept = [
            (rid, score)
            for rid, score in hits[i]  # hits are best first
            if ov[rid] <= cfg.max_overlap and ref_doc[rid] not in own[s]
        ]
        for rank, (rid, score) in enumerate(kept[: cfg.per_chunk] or [(None, None)]):
            for name, value in (
                ("seq_id", seq_ids[s]),
                ("chunk", c),
                ("rank", rank),
                ("ref_id", rid),
                ("score", score),
                ("overlap", ov[rid] if rid is not None else None),
                ("dropped", len(hits[i]) - len(kept) if rank == 0 else 0),
            ):
                rows[name].append(value)
    return pa.table(rows, schema=STAGED)


class PairShards(ShardActor):
    """The pair stage's actor: the tokenizer, embedder and tables loaded once, many shards of
    `train_sequences`."""

    columns = ("seq_id", "token_ids", "doc_ids")

    def __init__(self, bank, embedder_spec: str, tokenizer_path: str, cfg, method: str = "vector", **shard):
        super().__init__(**shard)
        from pipelines.embedder import load_embedder
        from pipelines.tokenizer import load
        from storage.lexical import uses_vectors
        from storage.vectors import search_params

        self.cfg, self.method = cfg, method  # the `pair:` section (jobs.config.pair.PairConfig), pickled by Ray
        # bm25 embeds nothing: no model to load
        self.embedder = load_embedder(embedder_spec) if uses_vectors(method) else None
        self.tokenizer = load(tokenizer_path)
        self.table = bank.table("embeddings")
        self.params = search_params(self.table)  # ~0.4 ms of index metadata: once per actor
        self.refs = bank.dataset("refs")

    def compute(self, t: pa.Table) -> pa.Table:
        return pair_shard(
            t.column("seq_id").to_pylist(),
            t.column("token_ids").to_pylist(),
            tokenizer=self.tokenizer,
            embedder=self.embedder,
            table=self.table,
            refs_ds=self.refs,
            cfg=self.cfg,
            params=self.params,
            doc_ids=t.column("doc_ids").to_pylist(),
            method=self.method,
        )
