"""The `pair:` section of the pipeline YAML (the pairing job, jobs/stages/pair.py).

Plain typed fields with range metadata, like jobs/config/__init__.py; __post_init__ checks them
(model.checked) and the one rule across fields, so a PairConfig built in code (tests, benches)
and one loaded from YAML are checked alike.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from model.checked import check_fields, require


@dataclass(frozen=True)
class PairConfig:
    # Candidate references retrieved per chunk before the overlap filter: several, because the
    # best hits of a chunk are usually its own text (a reference the sequence contains).
    k: int = field(default=8, metadata={"ge": 1})
    # Eq. 6 overlap with the whole sequence above which a candidate is leakage, not memory (paper: 90 %).
    max_overlap: float = field(default=0.9, metadata={"ge": 0, "le": 1})
    # References kept per chunk, best first: 1 for the paper's schedule (each chunk reads its own
    # best and the previous chunks'), model.mems_per_chunk for the serving schedule (a chunk reads
    # the references the chunk before it retrieved, as `m3 generate` does).
    per_chunk: int = field(default=5, metadata={"ge": 1})
    # Also drop references of the sequence's own documents (what `m3 eval` does to held-out text),
    # not only those the sequence contains (eq. 6 above max_overlap).
    exclude_own_docs: bool = False
    # Tokens per chunk: model.mem_chunk_size, derived from it when the config leaves it out
    # (jobs/config DERIVED); a config that states another value is refused.
    chunk_size: int = field(default=64, metadata={"ge": 1})
    embed_batch_size: int = field(default=64, metadata={"ge": 1})  # embedder forward batch
    query_batch_size: int = field(default=256, metadata={"ge": 1})  # vectors per LanceDB search call
    # exact=True bypasses the ANN index (ground truth, slower past the index threshold).
    exact: bool = False
    actors: int = field(default=1, metadata={"ge": 1})
    threads_per_actor: int = field(default=1, metadata={"ge": 1})
    # The unit of resumption: a killed job redoes at most one shard per actor.
    seqs_per_shard: int = field(default=64, metadata={"ge": 1})
    # Pair only the first max_tokens of each sequence (null = all): the tokens training reads
    # (train.max_tokens, derived from it when the config leaves it out); chunks past them would
    # cost embedding time and never be used.
    max_tokens: int | None = field(default=None, metadata={"ge": 1})

    def __post_init__(self):
        check_fields(self)
        require(self.per_chunk <= self.k, "per_chunk", f"at most k={self.k} (the candidates retrieved)", self.per_chunk)

    def output_knobs(self) -> dict:
        """The fields that decide the table's contents (and shard layout): the job key covers
        these; actors and threads only change how fast it gets there."""
        return {
            "k": self.k,
            "max_overlap": self.max_overlap,
            "chunk_size": self.chunk_size,
            "per_chunk": self.per_chunk,
            "exclude_own_docs": self.exclude_own_docs,
            "exact": self.exact,
            "seqs_per_shard": self.seqs_per_shard,
            "max_tokens": self.max_tokens,
        }
