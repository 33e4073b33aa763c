"""Small Hugging Face models built by transformers from a config with random weights, saved
locally with a tokenizer.json: the inputs of the import tests (nothing is downloaded)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

SHAPE = dict(
    hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=256
)

# name -> (transformers class names, config overrides, tokenizer length or None = vocab_size)
CASES = {
    # Llama 3: GQA 2, tied, llama3 RoPE scaling (short original context so the bands all matter)
    "llama3": (
        ("LlamaConfig", "LlamaForCausalLM"),
        dict(
            num_key_value_heads=2,
            vocab_size=96,
            tie_word_embeddings=True,
            rms_norm_eps=1e-5,
            bos_token_id=1,
            eos_token_id=2,
            rope_parameters=dict(
                rope_type="llama3",
                rope_theta=500000.0,
                factor=8.0,
                low_freq_factor=1.0,
                high_freq_factor=4.0,
                original_max_position_embeddings=64,
            ),
        ),
        None,
    ),
    # Llama 2 shape with attention biases, untied, no GQA
    "llama-bias": (
        ("LlamaConfig", "LlamaForCausalLM"),
        dict(num_key_value_heads=4, vocab_size=80, attention_bias=True, bos_token_id=1, eos_token_id=2),
        None,
    ),
    # Qwen2: q/k/v biases, tied, bos = eos, embedding matrix padded beyond the tokenizer
    "qwen2": (
        ("Qwen2Config", "Qwen2ForCausalLM"),
        dict(
            num_key_value_heads=2,
            vocab_size=100,
            tie_word_embeddings=True,
            bos_token_id=2,
            eos_token_id=2,
            rope_parameters=dict(rope_type="default", rope_theta=1000000.0),
        ),
        90,
    ),
    # Qwen3: q/k norms, untied, explicit head_dim (= hidden / heads: the one layout this model has)
    "qwen3": (
        ("Qwen3Config", "Qwen3ForCausalLM"),
        dict(num_key_value_heads=2, head_dim=8, vocab_size=88, bos_token_id=1, eos_token_id=2),
        None,
    ),
    # Mistral: GQA 4, untied, a sliding window longer than the contexts tested
    "mistral": (
        ("MistralConfig", "MistralForCausalLM"),
        dict(num_key_value_heads=1, vocab_size=72, sliding_window=128, bos_token_id=1, eos_token_id=2),
        None,
    ),
}


def write_tokenizer(directory: Path, n: int) -> None:
    """A word-level tokenizer.json of n ids: <unk>, <s>, </s>, then w3 ... w{n-1}."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, n)}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    (directory / "tokenizer.json").write_text(tok.to_str())


def make_hf_model(directory: Path, case: str, seed: int = 0):
    """Save the case's random model in `directory`; returns the transformers model (float32, eval)."""
    import transformers

    (config_cls, model_cls), overrides, tok_len = CASES[case]
    cfg = getattr(transformers, config_cls)(**{**SHAPE, **overrides})
    torch.manual_seed(seed)
    model = getattr(transformers, model_cls)(cfg).float().eval()
    with torch.no_grad():  # every weight random, norms and biases included (they start at 1 and 0)
        for name, p in model.named_parameters():
            p.copy_(torch.randn_like(p) * (0.1 if "norm" in name or "bias" in name else 0.08) + ("norm" in name))
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)
    write_tokenizer(directory, tok_len or cfg.vocab_size)
    return model


def hf_config(directory: Path) -> dict:
    return json.loads((directory / "config.json").read_text())
