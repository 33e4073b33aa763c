"""Stage 3 of ingestion, one shard at a time: tokenize the kept documents and cut them into
references (≤ 128 tokens, inside one document) and packed training sequences.

Sequences are packed within a shard, so a shard's output depends on nothing but the shard: the
few tokens left over at a shard's end are counted, not carried into the next shard.

Outputs under `out_dir` (seqs last: its presence means the shard is done):
    refs/<shard>.parquet, seqs/<shard>.parquet
"""

from __future__ import annotations

import hashlib
from upath import UPath

import numpy as np
import pyarrow as pa

from pipelines.assemble import is_dup
from pipelines.chunking import Packer, reference_spans, sentence_boundaries
from pipelines.tokenizer import EOS_ID, from_json
from storage.schemas import REFS, TRAIN_SEQUENCES
from storage.layout import upath
from storage.staging import iter_batches, write_atomic


def seqs_path(out_dir, shard_id: str) -> UPath:
    return upath(out_dir) / "seqs" / f"{shard_id}.parquet"


def token_hash(ids) -> str:
    return hashlib.blake2b(np.asarray(ids, dtype=np.int32).tobytes(), digest_size=8).hexdigest()


def chunk_shard(shard_id: str, out_dir: str | UPath, tokenizer_json: str, dup_ranks: np.ndarray,
                chunking) -> dict:
    out_dir = upath(out_dir)
    tok = from_json(tokenizer_json)
    refs: dict[str, list] = {name: [] for name in REFS.names}
    seqs: dict[str, list] = {name: [] for name in TRAIN_SEQUENCES.names}
    packer = Packer(seq_len=chunking.seq_len, eos_id=EOS_ID)
    doc_tokens = 0

    def emit(seq: dict) -> None:
        seqs["seq_id"].append(f"{shard_id}-{len(seqs['seq_id']):06d}")
        seqs["token_ids"].append(seq["token_ids"])
        seqs["doc_ids"].append(seq["doc_ids"])

    columns = ["rank", "doc_id", "text", "in_training", "in_bank"]
    for batch in iter_batches([out_dir / "docs" / f"{shard_id}.parquet"], columns=columns, batch_size=256):
        keep = ~is_dup(batch.column("rank").to_numpy(), dup_ranks)
        rows = [r for r, k in zip(zip(*(batch.column(c).to_pylist() for c in columns[1:])), keep) if k]
        texts = [r[1] for r in rows]
        for (doc_id, text, in_training, in_bank), enc in zip(rows, tok.encode_batch(texts, add_special_tokens=False)):
            ids, offsets = enc.ids, enc.offsets
            doc_tokens += len(ids)
            spans = reference_spans(len(ids), sentence_boundaries(text, offsets),
                                    chunking.ref_max_tokens, chunking.ref_min_tokens) if in_bank else []
            for ordinal, (start, end) in enumerate(spans):
                piece = ids[start:end]
                for name, value in (("ref_id", f"{doc_id}-{ordinal:04d}"), ("doc_id", doc_id),
                                    ("ordinal", ordinal), ("start_token", start), ("n_tokens", end - start),
                                    ("text", text[offsets[start][0]:offsets[end - 1][1]]),
                                    ("token_ids", piece), ("content_hash", token_hash(piece))):
                    refs[name].append(value)
            if in_training:  # a bank-only document is knowledge, not training text
                for seq in packer.add(doc_id, ids):
                    emit(seq)
    write_atomic(out_dir / "refs" / f"{shard_id}.parquet", pa.table(refs, schema=REFS))
    write_atomic(seqs_path(out_dir, shard_id), pa.table(seqs, schema=TRAIN_SEQUENCES))
    return {"shard": shard_id, "refs": len(refs["ref_id"]), "seqs": len(seqs["seq_id"]),
            "tokens": doc_tokens, "leftover_tokens": packer.leftover}
