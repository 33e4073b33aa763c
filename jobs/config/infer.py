"""The `infer:` section of the pipeline YAML: generation (`m3 generate`) and evaluation
(`m3 eval`, its `infer.eval:` subsection).

Plain typed fields with range metadata, like jobs/config/__init__.py; __post_init__ checks them
(model.checked), so an InferConfig built in code (tests, benches) and one loaded from YAML are
checked alike.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from model.checked import check_fields, require

MODES = ("memory", "none", "rag")


@dataclass(frozen=True)
class EvalConfig:
    # Held-out sequences scored (the split of jobs/training/trainer.py: train.heldout_fraction).
    sequences: int = field(default=32, metadata={"ge": 1})
    # Tokens of each sequence: the first chunk is the prompt, the rest is scored. Short enough
    # that RAG's 5 references (5 x 128 tokens) still fit the model's max_seq_len before them.
    tokens: int = field(default=256, metadata={"ge": 2})
    batch_size: int = field(default=4, metadata={"ge": 1})
    # References of documents no training sequence contains (held-out-only or bank-only
    # documents) whose loss the knowledge probe measures with and without memory.
    probe_refs: int = field(default=32, metadata={"ge": 0})
    # QA probes a user brings (jobs/inference/qa_probes.py): JSONL files, one item a line,
    # {"prompt": "Q: When was X born?\nA:", "answer": " 1842", "source_ids": ["e000123"]}
    # (source_ids optional: the corpus record ids, corpus.id_key, of the documents that hold
    # the answer). Scored with memory, without, with the control, the source's own memory,
    # random memories and RAG: answer-token loss and greedy exact match.
    probes: tuple[str, ...] = ()

    def __post_init__(self):
        check_fields(self)  # a list given in code becomes a tuple: hashable
        for i, p in enumerate(self.probes):
            require(bool(p.strip()), f"probes[{i}]", "the path of a JSONL file", p)


@dataclass(frozen=True)
class InferConfig:
    # A saved model directory; null = the bank's continual model if it exists, else the model
    # the memories table was encoded with (its lineage's model_dir): jobs/models.py.
    checkpoint: str | None = None
    # memory: retrieve every chunk (paper §3.1); none: no retrieval; rag: the retrieved
    # references' text prepended to the prompt, retrieved once from the prompt's last chunk.
    mode: str = field(default="memory", metadata={"choices": MODES})
    max_new_tokens: int = field(default=128, metadata={"ge": 1})
    temperature: float = field(default=0.0, metadata={"ge": 0})  # 0 = greedy
    top_p: float = field(default=1.0, metadata={"gt": 0, "le": 1})
    seed: int = 0
    # Evaluation-time leakage filter [paper §4.4]: a retrieved reference whose eq. 6 overlap
    # with the text it serves exceeds this is dropped. null = keep everything.
    max_overlap: float | None = field(default=2 / 3, metadata={"ge": 0, "le": 1})
    # Candidates retrieved per query before the filter; the best mems_per_chunk that pass are used.
    candidates: int = field(default=10, metadata={"ge": 1})
    # Decoded memories kept in RAM (LRU): adjacent chunks often retrieve the same references.
    cache_size: int = field(default=4096, metadata={"ge": 0})
    # The same cache bounded in bytes instead (decoded memories plus their kept-token counts:
    # MemoryStore.entry_bytes each); null = bound by cache_size. 0 = no cache.
    cache_bytes: int | None = field(default=None, metadata={"ge": 0})
    # Start the next chunk's retrieval in a thread while its last token is decoded, where the
    # thread has a core of its own (a GPU, or more cores than torch threads); false: never.
    prefetch: bool = True
    exact: bool = False  # exact vector scan instead of the ANN index
    batch_size: int = field(default=8, metadata={"ge": 1})  # prompts generated together
    # Where the model (and the query embedder) run; bfloat16 converts the loaded weights. The
    # memories keep the hash of the checkpoint as saved, so a bf16 copy reads its fp32 bank.
    device: str = "cpu"  # "cpu", "cuda", "cuda:1", ...
    dtype: str = field(default="float32", metadata={"choices": ("float32", "bfloat16")})
    # A bank whose sparsity (tokens kept per head) or codec differs from what the model was
    # trained to read is refused; true serves it anyway, with a warning (trade-off studies).
    allow_memory_mismatch: bool = False
    eval: EvalConfig = field(default_factory=EvalConfig)

    def __post_init__(self):
        check_fields(self)
