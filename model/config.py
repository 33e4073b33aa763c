"""Model configuration: one frozen dataclass of plain typed fields, plus named presets.

Plain fields (int, float, bool, str) only, so a YAML loader can validate a config by
introspecting `dataclasses.fields(ModelConfig)` and the checkpoint can store it as JSON.
Types and ranges are checked by `model.checked.check_fields` like every config section's;
__post_init__ then checks the rules that tie fields together (FieldError naming the field).
"""

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from .checked import check_fields, require

SCORE_COMBINES = ("sum", "mean", "max")
ROPE_SCALINGS = ("none", "llama3")
# fields added after the first checkpoints: left out of to_dict (and so of the hash) at their default
OPTIONAL_FIELDS = (
    "qkv_bias",
    "out_bias",
    "qk_norm",
    "rope_scaling",
    "rope_factor",
    "rope_low_freq_factor",
    "rope_high_freq_factor",
    "rope_original_max_len",
)


@dataclass(frozen=True)
class ModelConfig:
    # transformer shape
    vocab_size: int = field(default=8192, metadata={"ge": 1})
    n_layers: int = field(default=6, metadata={"ge": 1})
    n_heads: int = field(default=8, metadata={"ge": 1})  # query heads
    # key/value heads (GQA): n_heads // n_kv_heads query heads share one
    n_kv_heads: int = field(default=2, metadata={"ge": 1})
    head_dim: int = field(default=32, metadata={"ge": 1})
    d_model: int = field(default=256, metadata={"ge": 1})  # must equal n_heads * head_dim
    mlp_hidden: int = field(default=768, metadata={"ge": 1})  # SwiGLU inner width
    # longest context (not counting the memory positions before it)
    max_seq_len: int = field(default=1024, metadata={"ge": 1})
    rope_theta: float = field(default=10000.0, metadata={"gt": 0})
    norm_eps: float = field(default=1e-5, metadata={"gt": 0})
    tie_embeddings: bool = True
    init_std: float = field(default=0.02, metadata={"gt": 0})

    # explicit memory
    # memory layers are layers 0 .. n_mem_layers-1
    n_mem_layers: int = field(default=3, metadata={"ge": 1})
    # tokens kept per memory layer and KV head
    mem_top_k: int = field(default=8, metadata={"ge": 1})
    # context tokens that share one set of retrieved memories
    mem_chunk_size: int = field(default=64, metadata={"ge": 1})
    mems_per_chunk: int = field(default=5, metadata={"ge": 1})  # memories retrieved per chunk
    # reference length, not counting the prepended ref_bos
    ref_max_tokens: int = field(default=128, metadata={"ge": 1})
    # how the query heads of one KV head combine token scores
    score_combine: str = field(default="sum", metadata={"choices": SCORE_COMBINES})

    # special token ids (the tokenizer reserves exactly these)
    pad_id: int = field(default=0, metadata={"ge": 0})
    bos_id: int = field(default=1, metadata={"ge": 0})
    eos_id: int = field(default=2, metadata={"ge": 0})
    # one token standing for "<s>Reference:"
    ref_bos_id: int = field(default=3, metadata={"ge": 0})

    # what a model imported from Hugging Face may need (model/hf_config.py). to_dict leaves each of
    # these out while it holds its default, so every other model's config JSON and hash are unchanged
    qkv_bias: bool = False  # biases on the q, k, v projections (Qwen2, Llama attention_bias)
    out_bias: bool = False  # a bias on the attention output projection (Llama attention_bias)
    qk_norm: bool = False  # RMSNorm of each head's q and k before RoPE (Qwen3)
    # "llama3": Llama 3.1's frequency-dependent stretch of the RoPE wavelengths (model/rope.py)
    rope_scaling: str = field(default="none", metadata={"choices": ROPE_SCALINGS})
    rope_factor: float = field(default=8.0, metadata={"gt": 0})
    rope_low_freq_factor: float = field(default=1.0, metadata={"gt": 0})
    rope_high_freq_factor: float = field(default=4.0, metadata={"gt": 0})
    rope_original_max_len: int = field(default=8192, metadata={"ge": 1})

    def __post_init__(self):
        check_fields(self)
        require(self.head_dim % 2 == 0, "head_dim", "an even number (RoPE rotates pairs)", self.head_dim)
        require(
            self.n_heads % self.n_kv_heads == 0, "n_kv_heads", f"a divisor of n_heads={self.n_heads}", self.n_kv_heads
        )
        require(
            self.d_model == self.n_heads * self.head_dim,
            "d_model",
            f"n_heads*head_dim = {self.n_heads}*{self.head_dim}",
            self.d_model,
        )
        require(
            self.n_mem_layers <= self.n_layers, "n_mem_layers", f"at most n_layers={self.n_layers}", self.n_mem_layers
        )
        for name in ("pad_id", "bos_id", "eos_id", "ref_bos_id"):
            require(
                getattr(self, name) < self.vocab_size,
                name,
                f"a token id below vocab_size={self.vocab_size}",
                getattr(self, name),
            )
        ids = [self.pad_id, self.bos_id, self.eos_id, self.ref_bos_id]
        require(len(set(ids)) == 4, "ref_bos_id", "special token ids that are distinct (pad, bos, eos, ref_bos)", ids)

    @property
    def kv_group(self) -> int:
        """Query heads per KV head."""
        return self.n_heads // self.n_kv_heads

    @property
    def ctx_pos_offset(self) -> int:
        """RoPE position of the first context token when memories are attended.

        ref_bos (the attention sink) sits at 0 and every memory keeps its position in
        [1, ref_max_tokens] from its own reference ("parallel positions"), so the context
        starts right after that interval, as if each reference directly preceded it.
        """
        return self.ref_max_tokens + 1

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        defaults = {f.name: f.default for f in dataclasses.fields(self)}
        return {k: v for k, v in d.items() if k not in OPTIONAL_FIELDS or v != defaults[k]}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        for name in d:
            if name not in known:
                raise ValueError(f"ModelConfig: unknown field {name!r}")
        return cls(**d)

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "ModelConfig":
        if name not in PRESETS:
            raise ValueError(f"ModelConfig: unknown preset {name!r}; choose from {sorted(PRESETS)}")
        return cls.from_dict({**PRESETS[name], **overrides})


PRESETS: dict[str, dict[str, Any]] = {
    # unit tests: milliseconds per forward
    "tiny": dict(
        vocab_size=128,
        n_layers=2,
        n_heads=4,
        n_kv_heads=2,
        head_dim=8,
        d_model=32,
        mlp_hidden=64,
        n_mem_layers=1,
        max_seq_len=256,
        mem_top_k=4,
        mem_chunk_size=16,
        mems_per_chunk=2,
        ref_max_tokens=32,
    ),
    # the CPU demo: ~4.5M non-embedding parameters, learns a ~5 MB corpus with an 8k vocab in minutes
    "small": dict(
        vocab_size=8192,
        n_layers=6,
        n_heads=8,
        n_kv_heads=2,
        head_dim=32,
        d_model=256,
        mlp_hidden=768,
        n_mem_layers=3,
        max_seq_len=1024,
    ),
    # the paper's Memory3-2B (docs/paper.md, "Model shape"): 44 x (40q / 8kv x 80), gated MLP 3200, memory layers 0-21.
    # rope_theta, norm and tying are not stated by the paper (UNCONFIRMED): LLaMA-2 defaults.
    "paper-2.4b": dict(
        vocab_size=60416,
        n_layers=44,
        n_heads=40,
        n_kv_heads=8,
        head_dim=80,
        d_model=3200,
        mlp_hidden=3200,
        n_mem_layers=22,
        max_seq_len=2048,
        tie_embeddings=False,
    ),
}
