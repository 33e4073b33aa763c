"""A Hugging Face config.json <-> ModelConfig, for the architectures whose forward ours computes.

Supported: LlamaForCausalLM (Llama 2/3, with Llama 3.1's RoPE scaling; SmolLM is one),
Qwen2ForCausalLM (Qwen2 and 2.5: q/k/v biases), Qwen3ForCausalLM (q/k norms, where head_dim *
heads = hidden_size) and MistralForCausalLM (its sliding window bounds max_seq_len, below which
attention is the full causal one). Each is the same decoder as ours: pre-norm RMSNorm,
rotate-half RoPE, GQA, SwiGLU; tied or untied embeddings. Anything else is refused by name before
a tensor is read (Gemma's scaled embeddings, Phi's partial RoPE, ... would need layers this model
does not have).

Both transformers 4 (`rope_theta` + `rope_scaling`) and 5 (`rope_parameters`) spellings are read.
A key missing from config.json takes the default of transformers' class for that architecture
(save_pretrained may leave defaults out).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .config import ModelConfig
from .errors import M3Error

ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
    "MistralForCausalLM": "mistral",
}

# transformers 5's class defaults for the keys read here (LlamaConfig, Qwen2Config, MistralConfig)
_DEFAULTS: dict[str, dict[str, Any]] = {
    "llama": dict(max_position_embeddings=2048, rope_theta=10000.0, attention_bias=False, mlp_bias=False),
    "qwen2": dict(max_position_embeddings=32768, rope_theta=10000.0, use_sliding_window=False),
    "qwen3": dict(max_position_embeddings=32768, rope_theta=10000.0, use_sliding_window=False, attention_bias=False),
    "mistral": dict(max_position_embeddings=131072, rope_theta=10000.0, sliding_window=4096),
}
_COMMON = dict(rms_norm_eps=1e-6, tie_word_embeddings=False, hidden_act="silu", pretraining_tp=1)

# the memory side of a ModelConfig: not in a HF config, taken from the project's model section
MEMORY_FIELDS = ("n_mem_layers", "mem_top_k", "mem_chunk_size", "mems_per_chunk", "ref_max_tokens", "score_combine")


class HFModelError(M3Error, ValueError):
    """A model directory this project cannot import or export: one line naming the file and field."""


def read_hf_config(directory: str | Path) -> dict[str, Any]:
    path = Path(directory) / "config.json"
    if not Path(directory).is_dir():
        raise HFModelError(f"{directory}: not a directory (expected a Hugging Face model directory)")
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        raise HFModelError(f"{path}: missing (a Hugging Face model directory has config.json)") from None
    except (OSError, ValueError) as e:
        raise HFModelError(f"{path}: not readable JSON ({e})") from None
    if not isinstance(raw, dict):
        raise HFModelError(f"{path}: expected a JSON object, got {type(raw).__name__}")
    return raw


def architecture(hf: dict[str, Any], where: str) -> str:
    """The supported architecture a config names (its family: llama, qwen2, mistral), else refused."""
    names = hf.get("architectures") or []
    name = names[0] if names else None
    if name is None:  # older configs name only the model_type
        name = {v: k for k, v in ARCHITECTURES.items()}.get(hf.get("model_type"), hf.get("model_type"))
    if name not in ARCHITECTURES:
        raise HFModelError(f"{where}: architecture {name!r} is not supported (supported: {', '.join(ARCHITECTURES)})")
    return ARCHITECTURES[name]


def _rope(hf: dict[str, Any], family: str, where: str) -> dict[str, Any]:
    params = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    theta = params.get("rope_theta", hf.get("rope_theta", _DEFAULTS[family]["rope_theta"]))
    kind = params.get("rope_type", params.get("type", "default"))
    out: dict[str, Any] = {"rope_theta": float(theta)}
    if kind == "llama3":
        try:
            out.update(
                rope_scaling="llama3",
                rope_factor=float(params["factor"]),
                rope_low_freq_factor=float(params["low_freq_factor"]),
                rope_high_freq_factor=float(params["high_freq_factor"]),
                rope_original_max_len=int(params["original_max_position_embeddings"]),
            )
        except KeyError as e:
            raise HFModelError(f"{where}: rope_type llama3 without {e.args[0]}") from None
    elif kind != "default":
        raise HFModelError(f"{where}: rope_type {kind!r} is not supported (supported: default, llama3)")
    return out


def _single_id(value, key: str, where: str) -> int | None:
    if isinstance(value, list):  # Llama 3 instruct lists several; the first ends a document
        value = value[0] if value else None
    if value is not None and not isinstance(value, int):
        raise HFModelError(f"{where}: {key} expected a token id, got {value!r}")
    return value


def from_hf(hf: dict[str, Any], where: str, memory: dict[str, Any] | None = None) -> tuple[dict, dict]:
    """ModelConfig fields of a HF config (special ids left at the HF ones; model/hf_tokens.py settles
    them), and the facts the import reports (family, bos/eos/pad ids, vocab_size)."""
    family = architecture(hf, where)
    get = lambda key: hf[key] if hf.get(key) is not None else {**_COMMON, **_DEFAULTS[family]}.get(key)  # noqa: E731
    for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size"):
        if not isinstance(hf.get(key), int):
            raise HFModelError(f"{where}: {key} expected an integer, got {hf.get(key)!r}")
    if get("hidden_act") not in ("silu", "swish"):
        raise HFModelError(f"{where}: hidden_act {get('hidden_act')!r} is not supported (SwiGLU needs silu)")
    if get("mlp_bias"):
        raise HFModelError(f"{where}: mlp_bias true is not supported (the MLP has no biases)")
    if family in ("qwen2", "qwen3") and get("use_sliding_window"):
        raise HFModelError(f"{where}: use_sliding_window true is not supported (attention is full causal)")
    heads = hf["num_attention_heads"]
    kv_heads = get("num_key_value_heads") or heads
    head_dim = get("head_dim") or hf["hidden_size"] // heads
    if head_dim * heads != hf["hidden_size"]:
        raise HFModelError(
            f"{where}: head_dim*num_attention_heads = {head_dim}*{heads} != hidden_size {hf['hidden_size']}, "
            f"which this model's layout does not support"
        )
    max_len = int(get("max_position_embeddings"))
    if family == "mistral" and get("sliding_window"):
        max_len = min(max_len, int(get("sliding_window")))  # within the window attention is full causal
    # Llama and Qwen3: attention_bias puts a bias on all of q, k, v, o; Qwen2: on q, k, v always
    attn_bias = bool(get("attention_bias")) if family in ("llama", "qwen3") else family == "qwen2"
    fields: dict[str, Any] = dict(
        vocab_size=hf["vocab_size"],
        n_layers=hf["num_hidden_layers"],
        n_heads=heads,
        n_kv_heads=kv_heads,
        head_dim=head_dim,
        d_model=hf["hidden_size"],
        mlp_hidden=hf["intermediate_size"],
        max_seq_len=max_len,
        norm_eps=float(get("rms_norm_eps")),
        tie_embeddings=bool(get("tie_word_embeddings")),
        qkv_bias=attn_bias,
        out_bias=attn_bias and family in ("llama", "qwen3"),
        qk_norm=family == "qwen3",
        **_rope(hf, family, where),
    )
    memory = dict(memory or {})
    if "max_seq_len" in memory:  # the context the project trains on, within what the model knows
        memory["max_seq_len"] = min(memory["max_seq_len"], max_len)
    memory["n_mem_layers"] = min(memory.get("n_mem_layers", max(1, hf["num_hidden_layers"] // 2)), fields["n_layers"])
    fields.update(memory)
    facts = dict(
        family=family,
        bos_id=_single_id(hf.get("bos_token_id", _DEFAULTS_BOS.get(family)), "bos_token_id", where),
        eos_id=_single_id(hf.get("eos_token_id", _DEFAULTS_EOS.get(family)), "eos_token_id", where),
        pad_id=_single_id(hf.get("pad_token_id"), "pad_token_id", where),
    )
    return fields, facts


_DEFAULTS_BOS = {"llama": 1, "mistral": 1}
_DEFAULTS_EOS = {"llama": 2, "mistral": 2}


def to_hf(cfg: ModelConfig, arch: str | None = None) -> dict[str, Any]:
    """A config.json that transformers builds the same non-memory forward from.

    arch: None picks the family the config needs: q/k/v biases without an output bias are
    Qwen2's, everything else is Llama's (a Mistral with no window reached is a Llama).
    """
    if arch is None:
        arch = "Qwen2ForCausalLM" if cfg.qkv_bias and not cfg.out_bias else "LlamaForCausalLM"
        arch = "Qwen3ForCausalLM" if cfg.qk_norm else arch
    if arch not in ARCHITECTURES:
        raise HFModelError(f"export: architecture {arch!r} is not supported (supported: {', '.join(ARCHITECTURES)})")
    family = ARCHITECTURES[arch]
    if family == "qwen2" and (cfg.out_bias or not cfg.qkv_bias):
        raise HFModelError("export: Qwen2ForCausalLM needs q/k/v biases and no output bias (qkv_bias, out_bias)")
    if cfg.qk_norm != (family == "qwen3"):
        raise HFModelError(f"export: {arch} {'has no' if cfg.qk_norm else 'needs'} q/k norms (qk_norm)")
    if family != "qwen2" and cfg.qkv_bias != cfg.out_bias:
        raise HFModelError(f"export: {arch} has biases on all of q, k, v, o or none (qkv_bias, out_bias)")
    rope: dict[str, Any] = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    if cfg.rope_scaling == "llama3":
        rope = {
            "rope_type": "llama3",
            "rope_theta": cfg.rope_theta,
            "factor": cfg.rope_factor,
            "low_freq_factor": cfg.rope_low_freq_factor,
            "high_freq_factor": cfg.rope_high_freq_factor,
            "original_max_position_embeddings": cfg.rope_original_max_len,
        }
    out: dict[str, Any] = dict(
        architectures=[arch],
        model_type=family,
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.d_model,
        intermediate_size=cfg.mlp_hidden,
        num_hidden_layers=cfg.n_layers,
        num_attention_heads=cfg.n_heads,
        num_key_value_heads=cfg.n_kv_heads,
        head_dim=cfg.head_dim,
        hidden_act="silu",
        max_position_embeddings=cfg.max_seq_len + cfg.ctx_pos_offset,  # memory positions come first
        rms_norm_eps=cfg.norm_eps,
        tie_word_embeddings=cfg.tie_embeddings,
        rope_parameters=rope,
        rope_theta=cfg.rope_theta,  # transformers 4 reads these two
        bos_token_id=cfg.bos_id,
        eos_token_id=cfg.eos_id,
        pad_token_id=cfg.pad_id,
        torch_dtype="float32",
    )
    if cfg.rope_scaling == "llama3":
        out["rope_scaling"] = rope
    if family in ("llama", "qwen3"):
        out.update(attention_bias=cfg.qkv_bias, mlp_bias=False)
    if family in ("qwen2", "qwen3"):
        out.update(use_sliding_window=False, sliding_window=None)
    if family == "mistral":
        out["sliding_window"] = None
    return out
