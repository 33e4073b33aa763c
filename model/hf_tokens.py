"""The special tokens of an imported model: its own where it has them, reserved ones where not.

The model needs four distinct ids (model.ModelConfig): pad, bos, eos, and ref_bos, the `<ref>`
sink that stands for the paper's "<s>Reference:". eos is the model's own (documents are
EOS-separated, as in its pretraining) and must exist. bos and pad are its own when it has them
and they differ from eos (Qwen2's base models use one id for all three). `<ref>` is the
tokenizer's where it has one. Each missing token is added to tokenizer.json as a special token,
on a row the embedding matrix already has beyond the tokenizer's vocabulary (models pad their
matrices to a round size) or, when there is none, on a new row at the end.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .hf_config import HFModelError

REF_TOKEN, BOS_TOKEN, PAD_TOKEN = "<ref>", "<|m3_bos|>", "<|m3_pad|>"


def read_tokenizer(directory: str | Path) -> dict[str, Any]:
    path = Path(directory) / "tokenizer.json"
    try:
        tok = json.loads(path.read_text(encoding="utf-8"))
        vocab = tok["model"]["vocab"]
    except FileNotFoundError:
        raise HFModelError(f"{path}: missing (the bank tokenizes with the model's own tokenizer.json)") from None
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise HFModelError(f"{path}: not a tokenizers JSON with a model vocabulary ({e!r})") from None
    if not isinstance(vocab, dict):
        raise HFModelError(f"{path}: model.vocab expected a token -> id object (BPE), got {type(vocab).__name__}")
    return tok


def _token_ids(tok: dict[str, Any]) -> dict[str, int]:
    ids = dict(tok["model"]["vocab"])
    ids.update({a["content"]: a["id"] for a in tok.get("added_tokens") or []})
    return ids


def settle_special_tokens(tok: dict[str, Any], facts: dict[str, Any], vocab_size: int, where: str) -> dict[str, Any]:
    """{ids: {pad_id, bos_id, eos_id, ref_bos_id}, added: [{token, id, role, new_row}], vocab_size,
    tokenizer_len}; adds the reserved tokens to tok["added_tokens"] in place."""
    ids = _token_ids(tok)
    tok_len = max(ids.values()) + 1
    if tok_len > vocab_size:
        raise HFModelError(f"{where}: tokenizer.json has ids up to {tok_len - 1}, beyond vocab_size {vocab_size}")
    eos = facts.get("eos_id")
    if eos is None:
        raise HFModelError(f"{where}: eos_token_id missing (the bank separates documents with the model's EOS)")
    bos, pad = facts.get("bos_id"), facts.get("pad_id")
    taken = set(ids.values())
    free = (i for i in range(vocab_size) if i not in taken)  # spare rows first: lazily, in id order
    next_new = vocab_size
    added: list[dict[str, Any]] = []

    def reserve(token: str, role: str) -> int:
        nonlocal next_new
        if token in ids:
            return ids[token]
        i = next(free, None)
        new_row = i is None
        if new_row:
            i, next_new = next_new, next_new + 1
        tok.setdefault("added_tokens", []).append(
            dict(id=i, content=token, single_word=False, lstrip=False, rstrip=False, normalized=False, special=True)
        )
        ids[token] = i
        added.append(dict(token=token, id=i, role=role, new_row=new_row))
        return i

    if bos is None or bos == eos:
        bos = reserve(BOS_TOKEN, "bos_id")
    if pad is None or pad in (eos, bos):
        pad = reserve(PAD_TOKEN, "pad_id")
    ref = reserve(REF_TOKEN, "ref_bos_id")
    if ref in (pad, bos, eos):
        raise HFModelError(f"{where}: {REF_TOKEN} has id {ref}, already the model's pad, bos or eos")
    return dict(
        ids=dict(pad_id=pad, bos_id=bos, eos_id=eos, ref_bos_id=ref),
        added=added,
        vocab_size=next_new,
        tokenizer_len=tok_len,
    )
