"""STAND-IN for the pairing job (`m3 pair`, not built yet): writes a `neighbors` table by a
simple rule so the continual stage can be developed, tested and benchmarked. Not shipped as the
pairing job and not the paper's retriever or its eq. 6 overlap filter.

Rule: each chunk gets the reference with the highest IDF-weighted token overlap with the chunk,
among the references of documents that are NOT in this sequence (a crude, strict leakage
filter: no reference of a document the sequence contains can be its neighbor). ref_id is null
when no candidate shares a token with the chunk.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import scipy.sparse as sp

from pipelines.train_data import NEIGHBORS
from storage.bank import Bank


def _bags(lists, vocab: int) -> sp.csr_matrix:
    rows = np.repeat(np.arange(len(lists)), [len(x) for x in lists])
    cols = np.concatenate([np.asarray(x, dtype=np.int64) for x in lists]) if lists else np.zeros(0, np.int64)
    m = sp.csr_matrix((np.ones(len(cols), np.float32), (rows, cols)), shape=(len(lists), vocab))
    m.data[:] = 1.0  # presence, not counts
    return m


def write_standin_neighbors(bank_uri: str, chunk_size: int, max_tokens: int | None = None,
                            max_refs: int | None = None, block: int = 256) -> dict:
    bank = Bank(bank_uri)
    seqs = bank.dataset("train_sequences").to_table(columns=["seq_id", "token_ids", "doc_ids"])
    refs = bank.dataset("refs").to_table(columns=["ref_id", "doc_id", "token_ids"])
    if max_refs is not None:
        refs = refs.slice(0, max_refs)
    ref_ids = refs.column("ref_id").to_pylist()
    ref_doc = np.asarray(refs.column("doc_id").to_pylist())
    ref_toks = refs.column("token_ids").to_pylist()
    vocab = 1 + max(max(max(t) for t in ref_toks), max(max(t) for t in seqs.column("token_ids").to_pylist()))
    R = _bags(ref_toks, vocab)
    df = np.asarray(R.sum(axis=0)).ravel()
    idf = np.log((1 + R.shape[0]) / (1 + df)).astype(np.float32)
    R = (R @ sp.diags(idf)).tocsr()
    R = sp.diags(1 / np.maximum(np.sqrt(np.asarray(R.multiply(R).sum(axis=1)).ravel()), 1e-6)) @ R

    out_seq, out_chunk, chunk_toks, chunk_docs = [], [], [], []
    for sid, toks, docs in zip(*(seqs.column(n).to_pylist() for n in ("seq_id", "token_ids", "doc_ids"))):
        toks = toks[:max_tokens] if max_tokens else toks
        for c in range(0, len(toks), chunk_size):
            out_seq.append(sid)
            out_chunk.append(c // chunk_size)
            chunk_toks.append(toks[c:c + chunk_size])
            chunk_docs.append(set(docs))
    Q = (_bags(chunk_toks, vocab) @ sp.diags(idf)).tocsr()
    best_ref, best_score = [], []
    for lo in range(0, Q.shape[0], block):
        scores = (Q[lo:lo + block] @ R.T).toarray()
        for i in range(scores.shape[0]):
            own = np.isin(ref_doc, list(chunk_docs[lo + i]))
            scores[i, own] = -1.0  # the sequence's own documents are excluded
        j = scores.argmax(axis=1)
        s = scores[np.arange(len(j)), j]
        best_ref += [ref_ids[k] if v > 0 else None for k, v in zip(j, s)]
        best_score += [float(max(v, 0)) for v in s]
    table = pa.table({"seq_id": out_seq, "chunk": pa.array(out_chunk, pa.int32()),
                      "ref_id": best_ref, "score": pa.array(best_score, pa.float32()),
                      "overlap": pa.array([0.0] * len(out_seq), pa.float32())}, schema=NEIGHBORS)
    seq_meta = bank.metadata("train_sequences")
    lineage = {"stage": "pair-standin", "chunk_size": chunk_size,
               "ingest_key": seq_meta.get("ingest_key"), "tokenizer_hash": seq_meta.get("tokenizer_hash")}
    bank.write("neighbors", NEIGHBORS, table.to_batches(), lineage)
    hits = sum(r is not None for r in best_ref)
    return {"chunks": len(best_ref), "with_neighbor": hits}
