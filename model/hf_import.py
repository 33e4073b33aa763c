"""A local Hugging Face model directory -> this project's checkpoint, one tensor at a time.

What comes out is what model/checkpoint.py's save_model writes (model.safetensors with the model
hash in its metadata, config.json) plus the model's tokenizer.json with the reserved tokens
model/hf_tokens.py added, import.json (the report: source, architecture, every row the mapping
added and how it was initialised) and export.json (the lineage file a trained model carries:
stage "import", reads no memory yet). load_model reads it back and verifies the hash.

The mapping adds no weights to the memory layers: a memory is the K/V a layer already computes.
It adds embedding rows only, one per reserved token with no row of its own:
- `<ref>` (the sink every memory and every memory-reading context starts with) copies the row of
  the model's BOS token (the token it saw at position 0 in pretraining, so the sink starts as the
  hidden state the model already attends to as its sink); a model with no BOS: the mean row;
- any other reserved token (bos, pad) takes the mean of the tokenizer's rows;
- an untied LM head gets the mean of its rows for every added token (its logit starts at the
  average, never the favourite).

Peak memory is the largest tensor (twice, where rows are added), not the model: the bench
(bench/hf_import.py) measures it.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any, Callable

import torch

from .config import ModelConfig
from .files import CONFIG_FILE, WEIGHTS_FILE
from .hf_config import HFModelError, from_hf, read_hf_config
from .hf_safetensors import StreamWriter, TensorIndex
from .hf_tokens import REF_TOKEN, read_tokenizer, settle_special_tokens
from .transformer import Memory3

IMPORT_FILE = "import.json"
_HASH_PLACEHOLDER = "0" * 64


def hf_names(i: int) -> dict[str, str]:
    p = f"model.layers.{i}."
    return {
        "q": p + "self_attn.q_proj.",
        "k": p + "self_attn.k_proj.",
        "v": p + "self_attn.v_proj.",
        "o": p + "self_attn.o_proj.",
        "q_norm": p + "self_attn.q_norm.weight",
        "k_norm": p + "self_attn.k_norm.weight",
        "attn_norm": p + "input_layernorm.weight",
        "mlp_norm": p + "post_attention_layernorm.weight",
        "w_gate": p + "mlp.gate_proj.weight",
        "w_up": p + "mlp.up_proj.weight",
        "w_down": p + "mlp.down_proj.weight",
    }


def _producers(cfg: ModelConfig, src: TensorIndex, rows: Callable) -> dict[str, Callable[[], torch.Tensor]]:
    """Our state_dict name -> a function reading its tensor from the HF files."""
    out: dict[str, Callable[[], torch.Tensor]] = {
        "tok_emb.weight": lambda: rows(src.read("model.embed_tokens.weight"), "embed"),
        "norm.weight": lambda: src.read("model.norm.weight"),
    }
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = lambda: rows(src.read("lm_head.weight"), "head")
    for i in range(cfg.n_layers):
        n, b = hf_names(i), f"blocks.{i}."
        out[b + "attn_norm.weight"] = lambda n=n: src.read(n["attn_norm"])
        out[b + "mlp_norm.weight"] = lambda n=n: src.read(n["mlp_norm"])
        for ours in ("w_gate", "w_up", "w_down"):
            out[b + f"mlp.{ours}.weight"] = lambda n=n, ours=ours: src.read(n[ours])
        out[b + "attn.wqkv.weight"] = lambda n=n: torch.cat([src.read(n[x] + "weight") for x in "qkv"])
        out[b + "attn.wo.weight"] = lambda n=n: src.read(n["o"] + "weight")
        if cfg.qkv_bias:
            out[b + "attn.wqkv.bias"] = lambda n=n: torch.cat([src.read(n[x] + "bias") for x in "qkv"])
        if cfg.out_bias:
            out[b + "attn.wo.bias"] = lambda n=n: src.read(n["o"] + "bias")
        if cfg.qk_norm:
            out[b + "attn.q_norm.weight"] = lambda n=n: src.read(n["q_norm"])
            out[b + "attn.k_norm.weight"] = lambda n=n: src.read(n["k_norm"])
    return out


def _check_sources(cfg: ModelConfig, src: TensorIndex, hf_vocab: int, where: str) -> None:
    """Every tensor the mapping reads is there with the shape config.json implies: a mismatch
    is one line before anything is written."""
    D, hd = cfg.d_model, cfg.head_dim
    want = {"model.embed_tokens.weight": (hf_vocab, D), "model.norm.weight": (D,)}
    if not cfg.tie_embeddings:
        want["lm_head.weight"] = (hf_vocab, D)
    for i in range(cfg.n_layers):
        n = hf_names(i)
        want.update(
            {
                n["q"] + "weight": (cfg.n_heads * hd, D),
                n["k"] + "weight": (cfg.n_kv_heads * hd, D),
                n["v"] + "weight": (cfg.n_kv_heads * hd, D),
                n["o"] + "weight": (D, cfg.n_heads * hd),
                n["attn_norm"]: (D,),
                n["mlp_norm"]: (D,),
                n["w_gate"]: (cfg.mlp_hidden, D),
                n["w_up"]: (cfg.mlp_hidden, D),
                n["w_down"]: (D, cfg.mlp_hidden),
            }
        )
        if cfg.qkv_bias:
            want.update(
                {n[x] + "bias": (rows * hd,) for x, rows in zip("qkv", (cfg.n_heads, cfg.n_kv_heads, cfg.n_kv_heads))}
            )
        if cfg.out_bias:
            want[n["o"] + "bias"] = (D,)
        if cfg.qk_norm:
            want.update({n["q_norm"]: (hd,), n["k_norm"]: (hd,)})
    for name, shape in want.items():
        if name not in src:
            raise HFModelError(f"{where}: tensor {name} is missing from the weights")
        if tuple(src.shape(name)) != shape:
            raise HFModelError(
                f"{where}: tensor {name} has shape {tuple(src.shape(name))}, config.json implies {shape}"
            )


def import_hf(
    source: str | Path, out: str | Path, memory: dict[str, Any] | None = None, dtype: torch.dtype | None = None
) -> dict[str, Any]:
    """Write the checkpoint of the HF model in `source` to `out` (replaced whole: built in a
    sibling .tmp and renamed). memory: the memory fields (hf_config.MEMORY_FIELDS, max_seq_len)
    from the project's model section; n_mem_layers defaults to half the layers, as the paper's.
    dtype: of the written weights; None keeps the source's. Returns the report (import.json)."""
    source, out = Path(source), Path(out)
    where = str(source / "config.json")
    hf = read_hf_config(source)
    exported = source / "m3_config.json"  # a directory model/hf_export.py wrote: its memory shape
    if exported.exists():
        memory = {**json.loads(exported.read_text()), **(memory or {})}
    fields, facts = from_hf(hf, where, {k: v for k, v in (memory or {}).items() if not k.endswith("_id")})
    tok = read_tokenizer(source)
    src = TensorIndex(source)
    special = settle_special_tokens(tok, facts, hf["vocab_size"], str(source / "tokenizer.json"))
    cfg = ModelConfig.from_dict({**fields, **special["ids"], "vocab_size": special["vocab_size"]})
    _check_sources(cfg, src, hf["vocab_size"], where)
    dtype = dtype or src.dtype("model.embed_tokens.weight")

    added = special["added"]
    hf_bos = facts.get("bos_id")
    tok_len = special["tokenizer_len"]

    def rows(t: torch.Tensor, which: str) -> torch.Tensor:
        """The embedding (or LM head) with the reserved tokens' rows, see the module docstring."""
        if not added:
            return t
        t = t.to(dtype)
        if cfg.vocab_size > t.shape[0]:
            t = torch.cat([t, t.new_zeros(cfg.vocab_size - t.shape[0], t.shape[1])])
        mean = t[:tok_len].mean(0, dtype=torch.float32).to(dtype)  # no float copy of the matrix
        for a in added:
            ref_copy = which == "embed" and a["token"] == REF_TOKEN and hf_bos is not None and hf_bos < tok_len
            t[a["id"]] = t[hf_bos] if ref_copy else mean
        return t

    for a in added:
        how = "mean of the tokenizer's embedding rows"
        if a["token"] == REF_TOKEN and hf_bos is not None and hf_bos < tok_len:
            how = f"copy of the BOS row (id {hf_bos})"
        if not cfg.tie_embeddings:
            how += "; LM head row: mean of its rows"
        a["init"] = how

    with torch.device("meta"):  # names and shapes of our state_dict, no memory
        specs = [(k, dtype, tuple(v.shape)) for k, v in sorted(Memory3(cfg).state_dict().items())]
    producers = _producers(cfg, src, rows)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    # the hash model/checkpoint.py's model_hash computes, streamed in the same (sorted) order
    h = hashlib.sha256(json.dumps(cfg.to_dict(), sort_keys=True).encode())
    writer = StreamWriter(tmp / WEIGHTS_FILE, specs, {"model_hash": _HASH_PLACEHOLDER})
    try:
        for name, _, shape in specs:
            t = producers[name]().to(dtype).contiguous()
            h.update(f"\n{name}|{t.dtype}|{tuple(t.shape)}\n".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy())
            writer.write(name, t)
            del t
    except BaseException:  # a half-written checkpoint is never left where it could be loaded
        writer.f.close()
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    writer.close({"model_hash": h.hexdigest()})
    (tmp / CONFIG_FILE).write_text(json.dumps(cfg.to_dict(), indent=2, sort_keys=True) + "\n")
    (tmp / "tokenizer.json").write_text(json.dumps(tok, ensure_ascii=False), encoding="utf-8")
    report = dict(
        source=str(source.resolve()),
        architecture=(hf.get("architectures") or [facts["family"]])[0],
        family=facts["family"],
        model_hash=h.hexdigest(),
        dtype=str(dtype).removeprefix("torch."),
        vocab_size=dict(source=hf["vocab_size"], tokenizer=tok_len, model=cfg.vocab_size),
        special_ids=special["ids"],
        added_rows=added,
        memory={k: getattr(cfg, k) for k in ("n_mem_layers", "mem_top_k", "mem_chunk_size", "ref_max_tokens")},
        parameters=sum(_numel(s) for _, _, s in specs),
    )
    (tmp / IMPORT_FILE).write_text(json.dumps(report, indent=2) + "\n")
    (tmp / "export.json").write_text(
        json.dumps(
            {
                "stage": "import",
                "model_hash": report["model_hash"],
                "source": report["source"],
                "memory": {"reads_memory": False},
            },
            indent=2,
        )
        + "\n"
    )
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return report


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n
