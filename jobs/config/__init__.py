"""The pipeline's configuration: one YAML file, these sections, these keys.

    cfg = load_config("configs/demo.yaml", ["bank.uri=/tmp/bank", "ray.num_cpus=4"])

Each stage's knobs live in a frozen dataclass next to the code they steer when that code is a
pure step (quality filters, MinHash); the rest are declared here. `jobs.config.loader` reads the
file (a file may `extends:` another and state only what differs) and checks the keys; every
section's __post_init__ checks its values (types and range metadata through
`model.checked.check_fields`, then its rules across fields, each a FieldError naming the field),
so a config built in code is checked like a loaded one, and a wrong key, type or range fails
before any work starts. A key that follows from another (DERIVED) is derived when the file does
not state it; stated, it must agree.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from jobs.config.infer import InferConfig
from jobs.config.loader import ConfigError, Override, _Lined, _Where, apply_overrides, build, read_config, to_dict
from jobs.config.pair import PairConfig
from jobs.config.rebuild import RebuildConfig, ScheduleConfig
from jobs.config.serve import ServeConfig
from jobs.config.train import TrainConfig
from model.checked import FieldError, check_fields, require
from model.config import PRESETS, ModelConfig
from pipelines.filters import QualityConfig
from pipelines.minhash import MinHashConfig
from pipelines.readers import ROLES
from storage.layout import LayoutError, check_bank_uri
from storage.lexical import METHODS as RETRIEVAL_METHODS

__all__ = ["Config", "ConfigError", "load_config", "config_hash"]


@dataclass(frozen=True)
class RayConfig:
    # Connect to an existing cluster ("auto", "ray://host:10001", ...) instead of starting one.
    address: str | None = None
    # CPUs the embedded cluster may use; null = all of this machine's.
    num_cpus: int | None = field(default=None, metadata={"ge": 1})
    # The embedded cluster's dashboard (on loopback). Ray's State API lives in it, and Ray
    # Train's placement-group cleaner reads that API: without it the cleaner takes a healthy
    # run's controller for dead and tears the run down (seen after ~90 s of training).
    include_dashboard: bool = True
    object_store_mb: int | None = field(default=None, metadata={"ge": 64})

    def __post_init__(self):
        check_fields(self)


@dataclass(frozen=True)
class BankConfig:
    # Directory (or object-store URI) that holds every table of this bank. A local path is
    # made absolute against the working directory where the config is loaded: Ray workers
    # (Ray Train's above all) run in directories of their own.
    uri: str = "./bank/default"

    def __post_init__(self):
        check_fields(self)
        if "://" not in self.uri:
            object.__setattr__(self, "uri", str(Path(self.uri).absolute()))
        try:  # a file where the bank should be, or a scheme no bank lives at: refused now, not in LanceDB
            check_bank_uri(self.uri)
        except LayoutError as e:
            raise FieldError("uri", str(e)) from None


@dataclass(frozen=True)
class CorpusConfig:
    # Files, directories or glob patterns; directories are read recursively.
    paths: tuple[str, ...] = ()
    format: str = field(default="auto", metadata={"choices": ("auto", "jsonl", "parquet", "text")})
    text_key: str = "text"
    # A stable identifier of the record in its source; the line/row number when absent.
    id_key: str | None = "id"
    # Records per unit of parallel, resumable work.
    records_per_shard: int = field(default=2000, metadata={"ge": 1})
    # A record larger than this is rejected unread ("record_too_large"), so one huge line
    # cannot exhaust a worker's memory.
    max_record_bytes: int = field(default=64 * 2**20, metadata={"ge": 1024})
    # What each source is for, keyed by an entry of `paths` exactly as written there (a file,
    # folder or glob; every file it names gets the role), a path not named here is "both":
    #   bank:     knowledge only: references if it passes `bank_quality`, never training text
    #             (a user's knowledge base is usually not their pretraining text);
    #   training: training text only: sequences if it passes `quality`, never references;
    #   both:     each filter decides (training text if it passes `quality`, references if it
    #             passes `bank_quality`).
    # A record its role's filters all refuse is a reject with the reason of the filter its role
    # applies (the training filter's for "both"). A file named by two entries of different roles
    # is refused. e.g. roles: {data/kb.jsonl: bank, data/web/*.jsonl.gz: training}
    roles: dict[str, str] = field(default_factory=dict)

    def __post_init__(self):
        check_fields(self)
        require(bool(self.paths), "paths", "at least one file, directory or glob", self.paths)
        for path, role in self.roles.items():
            require(
                path in self.paths,
                "roles",
                f"{path!r} is not an entry of corpus.paths (a role is keyed by a "
                f"path exactly as written there: {', '.join(repr(p) for p in self.paths)})",
            )
            require(role in ROLES, "roles", f"the role of {path!r} must be one of {', '.join(ROLES)}, got {role!r}")

    def role_of(self, path: str) -> str:
        """The role of an entry of `paths`."""
        return self.roles.get(path, "both")


@dataclass(frozen=True)
class DedupConfig:
    exact: bool = True
    near: bool = True
    minhash: MinHashConfig = field(default_factory=MinHashConfig)
    # Hash partitions of the dedup keys; each is grouped by its own Ray task.
    partitions: int = field(default=8, metadata={"ge": 1, "le": 4096})

    def __post_init__(self):
        check_fields(self)


@dataclass(frozen=True)
class TokenizerConfig:
    # A local tokenizer.json to use as is; null = train a byte-level BPE on the clean corpus.
    path: str | None = None
    vocab_size: int = field(default=8192, metadata={"ge": 260, "le": 1_000_000})
    min_frequency: int = field(default=2, metadata={"ge": 1})

    def __post_init__(self):
        check_fields(self)


@dataclass(frozen=True)
class ChunkingConfig:
    # The paper: references of at most 128 tokens, training sequences of 2048.
    ref_max_tokens: int = field(default=128, metadata={"ge": 8, "le": 4096})
    # Cut at a sentence end only if the reference is at least this long already.
    ref_min_tokens: int = field(default=32, metadata={"ge": 1})
    seq_len: int = field(default=2048, metadata={"ge": 16})
    # Start every training document at a multiple of model.mem_chunk_size tokens (padding the gap
    # after the previous one's EOS): its chunks then retrieve with its own text and read memories
    # no other document chose. For corpora of short documents (a QA text shorter than a chunk
    # otherwise shares its chunk, and its memories, with a neighbour); costs the padding.
    align_docs: bool = False

    def __post_init__(self):
        check_fields(self)
        require(
            self.ref_min_tokens <= self.ref_max_tokens,
            "ref_min_tokens",
            f"a value <= ref_max_tokens ({self.ref_max_tokens})",
            self.ref_min_tokens,
        )


@dataclass(frozen=True)
class EncodeConfig:
    # A saved model directory (safetensors + config.json). null = the bank's newest trained
    # model (training/continual, else training/warmup), else the model of the `model:` section
    # freshly initialized with `seed` and saved into the bank once (the demo's start).
    checkpoint: str | None = None
    seed: int = 0
    codec: str = field(default="int8", metadata={"choices": ("raw-bf16", "raw-fp16", "raw-fp32", "int8", "vq")})
    # FAISS factory string for codec "vq"; null = the paper's structure scaled to head_dim.
    vq_spec: str | None = None
    # References sampled uniformly (seeded) to train the vector quantizer.
    vq_train_refs: int = field(default=512, metadata={"ge": 1})
    batch_size: int = field(default=32, metadata={"ge": 1})
    actors: int = field(default=1, metadata={"ge": 1})
    threads_per_actor: int = field(default=1, metadata={"ge": 1})
    refs_per_shard: int = field(default=1024, metadata={"ge": 1})
    # Cold start (paper §3.1): encode no reference; `memories` keeps only the rows it can reuse
    # (unchanged references of the same model and codec, rows written back at serving) and
    # every other reference is encoded by the serving MemoryStore the first time it is
    # retrieved, then written back (storage/warm.py).
    cold: bool = field(default=False, metadata={"choices": (False, True)})

    def __post_init__(self):
        check_fields(self)


@dataclass(frozen=True)
class RetrievalConfig:
    # "static-minilm" (default) = a static embedding distilled from all-MiniLM-L6-v2 at first use,
    # chosen by measurement (BENCHMARKS.md, "Choosing the retriever"); "minilm" = all-MiniLM-L6-v2
    # itself, shipped inside a PyPI package (offline); or a local sentence-transformers or
    # model2vec directory (the paper used BGE-M3: point this at a copy of it).
    embedder: str = "static-minilm"
    batch_size: int = field(default=64, metadata={"ge": 1})
    actors: int = field(default=1, metadata={"ge": 1})
    threads_per_actor: int = field(default=2, metadata={"ge": 1})
    refs_per_shard: int = field(default=1024, metadata={"ge": 1})
    # Below this many vectors an exact scan is as fast as an index (storage/vectors.py).
    index_threshold: int = field(default=10_000, metadata={"ge": 1})
    index_type: str = field(default="IVF_HNSW_SQ", metadata={"choices": ("IVF_HNSW_SQ", "IVF_PQ")})
    # How references are ranked for a text, the same in the pair stage, serving, `m3 search` and
    # the QA probe's oracle (storage/lexical.py): "vector" = cosine over `embedder`'s vectors;
    # "bm25" = LanceDB's full-text (BM25) index over the references' text, which matches names,
    # identifiers and rare words a static embedding splits into common pieces; "hybrid" =
    # reciprocal-rank fusion of both lists. bm25 and hybrid make `m3 embed` store each
    # reference's text beside its vector and index it (vectors are computed for every method).
    method: str = field(default="vector", metadata={"choices": RETRIEVAL_METHODS})

    def __post_init__(self):
        check_fields(self)


@dataclass(frozen=True)
class Config:
    name: str = "m3"
    ray: RayConfig = field(default_factory=RayConfig)
    bank: BankConfig = field(default_factory=BankConfig)
    corpus: CorpusConfig = field(default_factory=lambda: CorpusConfig(paths=("data/foldoc/foldoc.jsonl.gz",)))
    quality: QualityConfig = field(default_factory=QualityConfig)
    # The bank's own filter: a document that passes it but not `quality` becomes references
    # (the knowledge base keeps short dictionary entries, which are facts) without entering the
    # training sequences. null = the bank keeps what training keeps.
    bank_quality: QualityConfig | None = None
    dedup: DedupConfig = field(default_factory=DedupConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    chunking: ChunkingConfig = field(default_factory=ChunkingConfig)
    # The YAML's `model:` names a preset (tiny, small, paper-2.4b) and overrides any of its
    # fields; what is stored here and in lineage is the resolved, fully explicit ModelConfig.
    model: ModelConfig = field(default_factory=lambda: ModelConfig.from_preset("small"))
    encode: EncodeConfig = field(default_factory=EncodeConfig)
    retrieval: RetrievalConfig = field(default_factory=RetrievalConfig)
    pair: PairConfig = field(default_factory=PairConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    rebuild: RebuildConfig = field(default_factory=RebuildConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    infer: InferConfig = field(default_factory=InferConfig)
    # `m3 serve` (jobs/serve): the OpenAI-compatible API on Ray Serve
    serve: ServeConfig = field(default_factory=ServeConfig)
    # Where the config came from; relative corpus paths resolve against the working directory.
    source: str = field(default="<defaults>", compare=False)

    def __post_init__(self):
        check_fields(self)
        m, t, c, p, tr = self.model, self.tokenizer, self.chunking, self.pair, self.train
        require(
            t.path is not None or m.vocab_size == t.vocab_size,
            "model.vocab_size",
            f"tokenizer.vocab_size ({t.vocab_size}), the tokenizer the bank trains (leave it out to derive it)",
            m.vocab_size,
        )
        require(
            m.ref_max_tokens >= c.ref_max_tokens,
            "model.ref_max_tokens",
            f"at least chunking.ref_max_tokens ({c.ref_max_tokens}): references could not be encoded",
            m.ref_max_tokens,
        )
        require(
            p.chunk_size == m.mem_chunk_size,
            "pair.chunk_size",
            f"model.mem_chunk_size ({m.mem_chunk_size}): training reads the pairs chunk by chunk "
            f"(leave it out to derive it)",
            p.chunk_size,
        )
        require(
            not c.align_docs or c.seq_len % m.mem_chunk_size == 0,
            "chunking.seq_len",
            f"a multiple of model.mem_chunk_size ({m.mem_chunk_size}) with chunking.align_docs",
            c.seq_len,
        )
        require(
            p.max_tokens is None or (tr.max_tokens is not None and tr.max_tokens <= p.max_tokens),
            "train.max_tokens",
            f"at most pair.max_tokens ({p.max_tokens}): the continual stage would find "
            f"no neighbors for the chunks beyond",
            tr.max_tokens,
        )
        require(
            not ((tr.warmup_with_memory or tr.continual_with_memory) and tr.memory_schedule == "serving")
            or p.per_chunk >= m.mems_per_chunk,
            "pair.per_chunk",
            f"at least model.mems_per_chunk ({m.mems_per_chunk}): train.memory_schedule 'serving' reads as "
            f"many references per chunk as inference does",
            p.per_chunk,
        )

    def as_dict(self) -> dict:
        d = to_dict(self)
        d.pop("source")
        return d


# Keys that follow from another: (key, the key it is derived from, when). A config that leaves
# the key out gets the other's value (model.* ones replace the preset's); one that states both
# must make them agree where Config's rules say so (vocab_size, chunk_size). model.max_seq_len
# and pair.max_tokens only default to theirs: a model may read past its training length
# (configs/facts.yaml), pairing past what training reads only costs time.
DERIVED: tuple[tuple[str, str, Callable[[dict], bool]], ...] = (
    ("model.vocab_size", "tokenizer.vocab_size", lambda data: _value(data, "tokenizer.path") is None),
    ("model.max_seq_len", "chunking.seq_len", lambda data: True),
    ("pair.chunk_size", "model.mem_chunk_size", lambda data: True),
    ("pair.max_tokens", "train.max_tokens", lambda data: True),
)


def _value(data: dict, dotted: str):
    """The value of `dotted` in the raw mapping, else the default of its field."""
    section, key = dotted.split(".")
    raw = data.get(section)
    if isinstance(raw, dict) and key in raw:
        return raw[key]
    return getattr(next(f for f in dataclasses.fields(Config) if f.name == section).default_factory(), key)


def _derive(data: dict, model_stated: set[str]) -> None:
    """Fill in the DERIVED keys the config leaves out (the model's preset is resolved already;
    model_stated: the model keys the config itself states)."""
    for key, source, when in DERIVED:
        section, name = key.split(".")
        raw = data.get(section)
        if raw is None:
            raw = data[section] = _Lined()
        if not isinstance(raw, dict) or (name in model_stated if section == "model" else name in raw):
            continue
        if not when(data):
            continue
        raw[name] = _value(data, source)
        if isinstance(raw, _Lined):
            raw.lines[name] = f"= {source}"


def _resolve_model_preset(data: dict, where: _Where) -> set[str]:
    """Lay the model section over its preset; returns the keys the config states."""
    raw = data.get("model")
    if raw is None:
        raw = _Lined()
    if not isinstance(raw, dict):
        raise ConfigError(f"model ({where.at(data, 'model')}): expected a mapping, got {raw!r}")
    preset = raw.get("preset", "small")
    if preset not in PRESETS:
        raise ConfigError(
            f"model.preset ({where.at(raw, 'preset')}): expected one of "
            f"{', '.join(repr(p) for p in PRESETS)}, got {preset!r}"
        )
    merged = _Lined({**PRESETS[preset], **{k: v for k, v in raw.items() if k != "preset"}})
    merged.lines = getattr(raw, "lines", {})
    data["model"] = merged
    return set(raw) - {"preset"}


def load_config(path: str | Path | None, overrides: Sequence[Override] = ()) -> Config:
    """The config of `path` (None: the defaults) with `overrides` applied: `dotted.key=value`
    strings, or (dotted key, value, flag) for a command-line flag that stands for one."""
    data = read_config(path) if path is not None else _Lined()
    data = apply_overrides(data, overrides)
    where = _Where(str(path) if path else "<defaults>")
    stated = _resolve_model_preset(data, where)
    _derive(data, stated)
    data["source"] = str(path) if path is not None else "<defaults>"
    return build(Config, data, "", where)


def chunking_key(chunking: ChunkingConfig, packing: bool = True) -> dict:
    """The chunking section as a key. packing=False: what cutting one document depends on (the
    chunk memo's key), not how documents are packed into sequences. The packing switch joins a
    key only when on, so the banks built before it existed keep their keys."""
    d = to_dict(chunking)
    aligned = d.pop("align_docs")
    return {**d, "align_docs": True} if packing and aligned else d


def config_hash(section: object) -> str:
    """A short, stable hash of a config section (or several), for keys and lineage."""
    blob = json.dumps(to_dict(section), sort_keys=True, separators=(",", ":"))
    return hashlib.blake2b(blob.encode(), digest_size=8).hexdigest()
