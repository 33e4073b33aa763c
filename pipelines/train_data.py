"""What a training worker reads: its shard of `train_sequences`, in a seeded order, with the
neighbor references of every chunk for the continual stage.

Sharding is by row ranges of the training rows (held-out rows removed), equal lengths on every
rank so all ranks run the same number of steps (DeepSpeed's collectives need that). The order
of epoch e on rank r is a permutation seeded by (seed, e, r), so micro-batch i is a pure
function of (seed, rank, world, i): resuming at sample offset s replays exactly what an
uninterrupted run would have read next.

Lookups are batched: one `take` of the micro-batch's rows, one filtered scan of `refs` for all
their neighbors; the shard's `neighbors` rows are read once when the reader opens.
"""

from __future__ import annotations

import hashlib
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from storage.bank import Bank, BankError, tokens_of

__all__ = ["heldout_mask", "split_rows", "shard_rows", "ShardReader", "NEIGHBORS"]

# The pairing job's output (written by `m3 pair`): a chunk's best references, rank 0 first;
# one row with a null ref_id when none passed.
NEIGHBORS = pa.schema(
    [
        pa.field("seq_id", pa.string(), nullable=False),
        pa.field("chunk", pa.int32(), nullable=False),
        pa.field("rank", pa.int32(), nullable=False),
        pa.field("ref_id", pa.string()),
        # by the neighbors' lineage `method` (retrieval.method): cosine similarity (vector), BM25
        # (bm25: > 0, no fixed scale) or the reciprocal-rank-fusion sum (hybrid, <= 2/61)
        pa.field("score", pa.float32()),
        pa.field("overlap", pa.float32()),
    ]
)


def heldout_mask(seq_ids, fraction: float) -> np.ndarray:
    """True for the held-out sequences: a hash of the seq_id, so the split does not move when
    sequences are added or reordered, and training and evaluation agree without a table."""
    if fraction <= 0:
        return np.zeros(len(seq_ids), dtype=bool)
    u = [int.from_bytes(hashlib.blake2b(s.encode(), digest_size=8).digest(), "big") / 2**64 for s in seq_ids]
    return np.asarray(u) < fraction


def split_rows(bank: Bank, split: str, fraction: float) -> np.ndarray:
    """Row numbers of train_sequences in `split` ("train" or "heldout"), ascending."""
    if split not in ("train", "heldout"):
        raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
    ids = bank.dataset("train_sequences").to_table(columns=["seq_id"]).column("seq_id").to_pylist()
    held = heldout_mask(ids, fraction)
    return np.flatnonzero(held if split == "heldout" else ~held)


def shard_rows(rows: np.ndarray, rank: int, world: int) -> np.ndarray:
    """Rank's contiguous range; every rank gets floor(n / world) rows (the rest are unused)."""
    per = len(rows) // world
    if per == 0:
        raise BankError(f"{len(rows)} training sequence(s) cannot feed {world} worker(s)")
    return rows[rank * per : (rank + 1) * per]


class ShardReader:
    """Micro-batches of one rank: dict(tokens (B, S) int64, and with neighbors ref_tokens
    (B, n_chunks, M, T_ref) int64, ref_valid (B, n_chunks, M) bool: the best refs_per_chunk
    references of every chunk, best first; the same as ref_unique (U, T_ref), each reference of
    the batch once, and ref_slot (B, n_chunks, M), which one a slot holds or -1), plus seq_ids."""

    def __init__(
        self,
        bank: Bank,
        *,
        rank: int = 0,
        world: int = 1,
        seed: int = 0,
        micro_batch: int = 1,
        split: str = "train",
        heldout_fraction: float = 0.05,
        neighbors: bool = False,
        chunk_size: int = 64,
        max_tokens: int | None = None,
        pad_id: int = 0,
        shuffle: bool = True,
        refs_per_chunk: int = 1,
    ):
        self.bank = bank
        self.seqs = self.bank.dataset("train_sequences")
        self.rows = shard_rows(split_rows(self.bank, split, heldout_fraction), rank, world)
        self.rank, self.seed, self.micro_batch, self.shuffle = rank, seed, micro_batch, shuffle
        self.chunk_size, self.max_tokens, self.pad_id = chunk_size, max_tokens, pad_id
        self.refs_per_chunk = refs_per_chunk
        self.batches_per_epoch = len(self.rows) // micro_batch
        if self.batches_per_epoch == 0:
            raise BankError(f"rank {rank} has {len(self.rows)} sequence(s), fewer than micro_batch={micro_batch}")
        self.refs = self.bank.dataset("refs") if neighbors else None
        self.neighbors = self._load_neighbors() if neighbors else None

    def _load_neighbors(self) -> dict[str, dict[int, list[str]]]:
        if not self.bank.has("neighbors"):
            raise BankError(f"bank {self.bank.uri} has no neighbors table: run `m3 pair` first")
        meta, seq_meta = self.bank.metadata("neighbors"), self.bank.metadata("train_sequences")
        # provenance: neighbors computed for another corpus/tokenizer must never be paired
        for key in ("ingest_key", "tokenizer_hash"):
            if meta.get(key) is not None and meta.get(key) != seq_meta.get(key):
                raise BankError(
                    f"neighbors table was computed for {key}={meta.get(key)}, but "
                    f"train_sequences has {seq_meta.get(key)}: rerun `m3 pair`"
                )
        if meta.get("chunk_size") not in (None, self.chunk_size):
            raise BankError(
                f"neighbors table pairs {meta['chunk_size']}-token chunks; the model's "
                f"mem_chunk_size is {self.chunk_size}"
            )
        paired = meta.get("max_tokens")
        if paired is not None and (self.max_tokens is None or self.max_tokens > paired):
            raise BankError(
                f"neighbors table pairs the first {paired} tokens of each sequence; training "
                f"reads {self.max_tokens or 'all'}: set pair.max_tokens to train.max_tokens "
                f"and rerun `m3 pair`"
            )
        if meta.get("leakage") != "whole-sequence":
            raise BankError(
                "the neighbors table measured leakage against a truncated window (a reference "
                "straddling its edge could hold the trained text): rerun `m3 pair`"
            )
        if (meta.get("per_chunk") or 1) < self.refs_per_chunk:
            raise BankError(
                f"neighbors table keeps {meta.get('per_chunk') or 1} reference(s) per chunk; "
                f"training reads {self.refs_per_chunk}: set pair.per_chunk and rerun `m3 pair`"
            )
        mine = self.seqs.take(self.rows, columns=["seq_id"]).column("seq_id")
        table = self.bank.dataset("neighbors").to_table(columns=["seq_id", "chunk", "rank", "ref_id"])
        table = table.filter(pc.is_in(table["seq_id"], value_set=mine))
        table = table.filter(pc.and_(pc.is_valid(table["ref_id"]), pc.less(table["rank"], self.refs_per_chunk)))
        table = table.sort_by([("seq_id", "ascending"), ("chunk", "ascending"), ("rank", "ascending")])
        out: dict[str, dict[int, list[str]]] = {}
        for s, c, r in zip(*(table[n].to_pylist() for n in ("seq_id", "chunk", "ref_id"))):
            out.setdefault(s, {}).setdefault(c, []).append(r)
        return out

    def order(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return self.rows
        rng = np.random.default_rng([self.seed, epoch, self.rank])
        return self.rows[rng.permutation(len(self.rows))]

    def batch(self, index: int) -> dict:
        """Micro-batch number `index` of this rank (counting across epochs)."""
        epoch, j = divmod(index, self.batches_per_epoch)
        rows = self.order(epoch)[j * self.micro_batch : (j + 1) * self.micro_batch]
        return self.read(rows)

    def iterate(self, start_sample: int = 0) -> Iterator[dict]:
        """Endless micro-batches from a sample offset (a multiple of micro_batch)."""
        if start_sample % self.micro_batch:
            raise ValueError(f"start_sample {start_sample} is not a multiple of micro_batch")
        index = start_sample // self.micro_batch
        while True:
            yield self.batch(index)
            index += 1

    def epoch_batches(self) -> Iterator[dict]:
        """One pass over the shard in table order (evaluation)."""
        for j in range(self.batches_per_epoch):
            yield self.read(self.rows[j * self.micro_batch : (j + 1) * self.micro_batch])

    def read(self, rows: np.ndarray) -> dict:
        import torch

        order = np.argsort(rows, kind="stable")
        got = self.seqs.take(np.asarray(rows)[order], columns=["seq_id", "token_ids"])
        back = np.empty_like(order)
        back[order] = np.arange(len(order))
        got = got.take(pa.array(back))  # back in the requested order
        seq_ids = got.column("seq_id").to_pylist()
        toks = got.column("token_ids").to_pylist()
        S = min(len(t) for t in toks) if self.max_tokens is None else self.max_tokens
        tokens = torch.tensor([(t + [self.pad_id] * S)[:S] for t in toks], dtype=torch.long)
        out = {"seq_ids": seq_ids, "tokens": tokens}
        if self.neighbors is not None:
            out.update(self._refs(seq_ids, S))
        return out

    def _refs(self, seq_ids: list[str], S: int) -> dict:
        import torch

        C = (S + self.chunk_size - 1) // self.chunk_size
        wanted = sorted({r for s in seq_ids for c, rs in self.neighbors.get(s, {}).items() if c < C for r in rs})
        ref_tokens: dict[str, list[int]] = tokens_of(self.refs, wanted)
        missing = set(wanted) - set(ref_tokens)
        if missing:
            raise BankError(
                f"neighbors name {len(missing)} reference(s) absent from refs, e.g. "
                f"{sorted(missing)[0]!r}: the tables are from different builds"
            )
        T = max([len(v) for v in ref_tokens.values()] + [1])
        M = self.refs_per_chunk
        refs = torch.full((len(seq_ids), C, M, T), self.pad_id, dtype=torch.long)
        slot = torch.full((len(seq_ids), C, M), -1, dtype=torch.long)
        unique = torch.full((len(wanted), T), self.pad_id, dtype=torch.long)
        index = {r: i for i, r in enumerate(wanted)}
        for r, i in index.items():
            unique[i, : len(ref_tokens[r])] = torch.tensor(ref_tokens[r], dtype=torch.long)
        for b, s in enumerate(seq_ids):
            for c, rs in self.neighbors.get(s, {}).items():
                if c >= C:
                    continue
                for m, r in enumerate(rs):
                    refs[b, c, m] = unique[index[r]]
                    slot[b, c, m] = index[r]
        return {"ref_tokens": refs, "ref_valid": slot >= 0, "ref_unique": unique, "ref_slot": slot}
