"""Stage 3 of ingestion, one shard at a time: tokenize the kept documents and cut them into
references (≤ 128 tokens, inside one document) and packed training sequences.

Sequences are packed within a shard, so a shard's output depends on nothing but the shard: the
few tokens left over at a shard's end are counted, not carried into the next shard.

Outputs under `out_dir` (seqs last: its presence means the shard is done):
    refs/<shard>.parquet, seqs/<shard>.parquet
"""

from __future__ import annotations

import hashlib

import numpy as np
import pyarrow as pa
from upath import UPath

from pipelines import memo
from pipelines.assemble import is_dup
from pipelines.chunking import Packer, reference_spans, sentence_boundaries
from pipelines.tokenizer import EOS_ID, PAD_ID, from_json
from storage.layout import upath
from storage.schemas import REFS, TRAIN_SEQUENCES
from storage.staging import iter_batches, write_atomic


def seqs_path(out_dir, shard_id: str) -> UPath:
    return upath(out_dir) / "seqs" / f"{shard_id}.parquet"


def token_hash(ids) -> str:
    return hashlib.blake2b(np.asarray(ids, dtype=np.int32).tobytes(), digest_size=8).hexdigest()


# The chunk memo: what the tokenizer and the reference cutter make of one normalized text.
CHUNK_MEMO = pa.schema(
    [
        memo.KEY,
        pa.field("token_ids", pa.list_(pa.int32())),
        # reference spans in tokens and characters; None when the document was not in the bank
        pa.field("spans", pa.list_(pa.list_(pa.int32(), 4))),
    ]
)


def _cut(tok, texts: list[str], in_bank: list[bool], chunking) -> list[dict]:
    """Token ids and reference spans (start, end, first char, end char) of each text."""
    out = []
    for text, bank, enc in zip(texts, in_bank, tok.encode_batch(texts, add_special_tokens=False)):
        ids, offsets = enc.ids, enc.offsets
        spans = None
        if bank and len(ids) <= chunking.ref_max_tokens:
            # one span, whatever the boundaries (reference_spans' first rule): most entries of
            # a dictionary, and the per-document numpy calls would cost more than their tokenizing
            spans = [[0, len(ids), offsets[0][0], offsets[-1][1]]] if ids else []
        elif bank:
            spans = [
                [start, end, offsets[start][0], offsets[end - 1][1]]
                for start, end in reference_spans(
                    len(ids), sentence_boundaries(text, offsets), chunking.ref_max_tokens, chunking.ref_min_tokens
                )
            ]
        out.append({"token_ids": ids, "spans": spans})
    return out


def chunk_shard(
    shard_id: str,
    out_dir: str | UPath,
    tokenizer_json: str,
    dup_ranks: np.ndarray,
    chunking,
    memo_src: str | None = None,
    memo_dst: str | None = None,
    align: int = 0,
    eos_id: int = EOS_ID,
    pad_id: int = PAD_ID,
) -> dict:
    """With `memo_src` (pipelines/memo.py), a document whose normalized text is in the memo takes
    its token ids and reference spans from there; `memo_dst` receives this shard's entries. The
    caller keys both by the tokenizer's hash and the chunking config. Ids of rows (ref_id,
    seq_id) and the packing are made here either way: they are not functions of one text.
    align: start every document at a multiple of this many tokens (0 = back to back; Packer).
    eos_id, pad_id: the model's (an imported model's tokenizer keeps its own ids)."""
    out_dir = upath(out_dir)
    tok = from_json(tokenizer_json)
    refs: dict[str, list] = {name: [] for name in REFS.names}
    seqs: dict[str, list] = {name: [] for name in TRAIN_SEQUENCES.names}
    packer = Packer(seq_len=chunking.seq_len, eos_id=eos_id, align=align, pad_id=pad_id)
    doc_tokens = 0

    def emit(seq: dict) -> None:
        seqs["seq_id"].append(f"{shard_id}-{len(seqs['seq_id']):06d}")
        seqs["token_ids"].append(seq["token_ids"])
        seqs["doc_ids"].append(seq["doc_ids"])

    columns = ["rank", "doc_id", "text", "in_training", "in_bank"]
    rows = []
    for batch in iter_batches([out_dir / "docs" / f"{shard_id}.parquet"], columns=columns):
        keep = ~is_dup(batch.column("rank").to_numpy(), dup_ranks)
        rows += [r for r, k in zip(zip(*(batch.column(c).to_pylist() for c in columns[1:])), keep) if k]
    keys = [memo.text_key(text) for _, text, _, _ in rows]
    entries = memo.lookup(memo_src, keys, CHUNK_MEMO.names[1:])  # one lookup per shard
    # a memo entry made for a training-only document has no spans: cut it again for the bank
    todo = list(
        {
            k: i
            for i, (k, r) in reversed(list(enumerate(zip(keys, rows))))
            if k not in entries or (r[3] and entries[k]["spans"] is None)
        }.values()
    )
    for start in range(0, len(todo), 256):  # encode_batch in slices: bounded memory, Rust threads busy
        part = todo[start : start + 256]
        for i, cut in zip(part, _cut(tok, [rows[i][1] for i in part], [rows[i][3] for i in part], chunking)):
            entries[keys[i]] = cut
    hits = len(rows) - len(todo)
    for (doc_id, text, in_training, in_bank), key in zip(rows, keys):
        ids, spans = entries[key]["token_ids"], entries[key]["spans"]
        doc_tokens += len(ids)
        for ordinal, (start, end, first, last) in enumerate(spans if in_bank else []):
            piece = ids[start:end]
            for name, value in (
                ("ref_id", f"{doc_id}-{ordinal:04d}"),
                ("doc_id", doc_id),
                ("ordinal", ordinal),
                ("start_token", start),
                ("n_tokens", end - start),
                ("text", text[first:last]),
                ("token_ids", piece),
                ("content_hash", token_hash(piece)),
            ):
                refs[name].append(value)
        if in_training:  # a bank-only document is knowledge, not training text
            for seq in packer.add(doc_id, ids):
                emit(seq)
    if memo_dst is not None:
        memo.write(
            memo_dst,
            shard_id,
            CHUNK_MEMO,
            {"key": list(entries), **{c: [e[c] for e in entries.values()] for c in CHUNK_MEMO.names[1:]}},
        )
    write_atomic(out_dir / "refs" / f"{shard_id}.parquet", pa.table(refs, schema=REFS))
    write_atomic(seqs_path(out_dir, shard_id), pa.table(seqs, schema=TRAIN_SEQUENCES))
    return {
        "shard": shard_id,
        "refs": len(refs["ref_id"]),
        "seqs": len(seqs["seq_id"]),
        "tokens": doc_tokens,
        "leftover_tokens": packer.leftover,
        "memo_hits": hits,
    }
