"""This project's checkpoint -> a Hugging Face directory whose non-memory forward transformers runs.

config.json in transformers' own keys (model/hf_config.py's to_hf), model.safetensors with
transformers' tensor names (the fused q/k/v split back), streamed one tensor at a time, and the
tokenizer (the checkpoint's own tokenizer.json, or the one passed). The memory fields have no
place in a HF config; they ride along in m3_config.json, which import reads back, so a round
trip keeps the memory shape as well as every weight.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from .config import ModelConfig
from .files import CONFIG_FILE, WEIGHTS_FILE
from .hf_config import HFModelError, to_hf
from .hf_import import hf_names
from .hf_safetensors import StreamWriter, TensorIndex

M3_CONFIG = "m3_config.json"


def export_hf(
    checkpoint: str | Path, out: str | Path, tokenizer: str | Path | None = None, arch: str | None = None
) -> dict:
    """Write `out` (replaced whole) from the model in `checkpoint`. Returns the HF config."""
    checkpoint, out = Path(checkpoint), Path(out)
    try:
        cfg = ModelConfig.from_dict(json.loads((checkpoint / CONFIG_FILE).read_text()))
    except (OSError, ValueError) as e:
        raise HFModelError(f"{checkpoint / CONFIG_FILE}: not a model config ({e})") from None
    hf = to_hf(cfg, arch)
    src = TensorIndex(checkpoint)
    plan: list[tuple[str, callable]] = [("model.embed_tokens.weight", lambda: src.read("tok_emb.weight"))]
    plan.append(("model.norm.weight", lambda: src.read("norm.weight")))
    if not cfg.tie_embeddings:
        plan.append(("lm_head.weight", lambda: src.read("lm_head.weight")))
    sizes = [cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim]
    for i in range(cfg.n_layers):
        n, b = hf_names(i), f"blocks.{i}."
        plan += [
            (n["attn_norm"], lambda b=b: src.read(b + "attn_norm.weight")),
            (n["mlp_norm"], lambda b=b: src.read(b + "mlp_norm.weight")),
            (n["o"] + "weight", lambda b=b: src.read(b + "attn.wo.weight")),
        ]
        plan += [
            (n[ours], lambda b=b, ours=ours: src.read(b + f"mlp.{ours}.weight"))
            for ours in ("w_gate", "w_up", "w_down")
        ]
        for part in ("weight", "bias") if cfg.qkv_bias else ("weight",):
            for j, x in enumerate("qkv"):
                plan.append(
                    (n[x] + part, lambda b=b, part=part, j=j: src.read(b + f"attn.wqkv.{part}").split(sizes)[j].clone())
                )
        if cfg.out_bias:
            plan.append((n["o"] + "bias", lambda b=b: src.read(b + "attn.wo.bias")))
        if cfg.qk_norm:
            plan.append((n["q_norm"], lambda b=b: src.read(b + "attn.q_norm.weight")))
            plan.append((n["k_norm"], lambda b=b: src.read(b + "attn.k_norm.weight")))
    plan.sort(key=lambda p: p[0])
    dtype = src.dtype("tok_emb.weight")
    hf["torch_dtype"] = hf["dtype"] = str(dtype).removeprefix("torch.")
    specs = []
    for name, _ in plan:  # shapes from the checkpoint's header, no tensor read yet
        specs.append((name, dtype, _shape_of(name, cfg)))

    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    writer = StreamWriter(tmp / WEIGHTS_FILE, specs, {"format": "pt"})
    for name, read in plan:
        writer.write(name, read().to(dtype).contiguous())
    writer.close({"format": "pt"})
    (tmp / "config.json").write_text(json.dumps(hf, indent=2) + "\n")
    memory = {
        k: v
        for k, v in cfg.to_dict().items()
        if k
        in (
            "n_mem_layers",
            "mem_top_k",
            "mem_chunk_size",
            "mems_per_chunk",
            "ref_max_tokens",
            "score_combine",
            "max_seq_len",
            "pad_id",
            "bos_id",
            "eos_id",
            "ref_bos_id",
        )
    }
    (tmp / M3_CONFIG).write_text(json.dumps(memory, indent=2) + "\n")
    tok = Path(tokenizer) if tokenizer else checkpoint / "tokenizer.json"
    if tok.exists():
        shutil.copyfile(tok, tmp / "tokenizer.json")
        _tokenizer_config(tmp, cfg, json.loads(tok.read_text(encoding="utf-8")))
    elif tokenizer:
        raise HFModelError(f"{tokenizer}: no such tokenizer file")
    ids = {"bos_token_id": cfg.bos_id, "eos_token_id": cfg.eos_id, "pad_token_id": cfg.pad_id}
    (tmp / "generation_config.json").write_text(json.dumps(ids, indent=2) + "\n")
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return hf


def _tokenizer_config(out: Path, cfg: ModelConfig, tok: dict) -> None:
    """tokenizer_config.json naming the special tokens by their text, so AutoTokenizer knows
    which ids are bos, eos and pad (tokenizer.json alone does not say)."""
    names = {i: t for t, i in (tok.get("model") or {}).get("vocab", {}).items()}
    names.update({a["id"]: a["content"] for a in tok.get("added_tokens") or []})
    config = {"tokenizer_class": "PreTrainedTokenizerFast"}
    for key, i in (("bos_token", cfg.bos_id), ("eos_token", cfg.eos_id), ("pad_token", cfg.pad_id)):
        if i in names:
            config[key] = names[i]
    if cfg.ref_bos_id in names:
        config["additional_special_tokens"] = [names[cfg.ref_bos_id]]
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")


def _shape_of(name: str, cfg: ModelConfig) -> tuple[int, ...]:
    D, hd = cfg.d_model, cfg.head_dim
    if name in ("model.embed_tokens.weight", "lm_head.weight"):
        return (cfg.vocab_size, D)
    rows = {"q_proj": cfg.n_heads * hd, "k_proj": cfg.n_kv_heads * hd, "v_proj": cfg.n_kv_heads * hd}
    for proj, r in rows.items():
        if proj in name:
            return (r, D) if name.endswith("weight") else (r,)
    if "q_norm" in name or "k_norm" in name:
        return (hd,)
    if "o_proj" in name:
        return (D, cfg.n_heads * hd) if name.endswith("weight") else (D,)
    if "gate_proj" in name or "up_proj" in name:
        return (cfg.mlp_hidden, D)
    if "down_proj" in name:
        return (D, cfg.mlp_hidden)
    return (D,)  # the norms
