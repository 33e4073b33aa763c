"""Which tokens of a reference a memory keeps, measured against the tokens that matter: the
answer a QA probe item asks for (issue 24, part 6; bench/facts_sparsity.py).

A memory keeps, per memory layer and KV head, the top-k tokens of its reference ranked by
w_j = sum_i exp(q_i . k_j / sqrt(D)) over the reference's tokens i (model/memory.py
encode_references: no causal mask, no positions, ref_bos never kept). `kept_shares` asks the
model's own selection which of the answer's tokens each head keeps at each k, beside what a
random choice of k tokens would keep.
"""

from __future__ import annotations

import re

import numpy as np
import torch


def answer_positions(tokenizer, text: str, token_ids: list[int], answer: str) -> list[int] | None:
    """Indices of the reference's tokens that overlap a whole-word occurrence of the answer in
    its text ([] where it has none); None where the text does not re-tokenize to the stored ids
    (its offsets are then not the tokens')."""
    enc = tokenizer.encode(text, add_special_tokens=False)
    if list(enc.ids) != list(token_ids):
        return None
    value = answer.strip()
    spans = [m.span() for m in re.finditer(rf"(?<!\w){re.escape(value)}(?!\w)", text)] if value else []
    return [t for t, (a, b) in enumerate(enc.offsets) if any(a < e and s < b for s, e in spans)]


@torch.no_grad()
def kept_shares(model, refs: dict[str, list[int]], wanted: list[tuple[str, list[int]]], ks) -> dict:
    """Per k: "heads", (n_mem_layers, n_kv_heads) nested lists, the share of the wanted token
    positions each head's top-k keeps, weighted by tokens over the items; "chance", the share k
    tokens drawn at random would keep (k / the reference's length, at most 1). refs: ref_id ->
    its token ids; wanted: per item (ref_id, positions in that reference), a reference asked
    about twice counting twice."""
    cfg = model.config
    ids = sorted({r for r, _ in wanted})
    row = {r: b for b, r in enumerate(ids)}
    width = max(len(refs[r]) for r in ids)
    batch = torch.tensor([refs[r] + [cfg.pad_id] * (width - len(refs[r])) for r in ids], dtype=torch.long)
    total = sum(len(p) for _, p in wanted)
    out = {}
    for k in ks:
        pos = model.encode_references(batch, top_k=k).positions  # (B, L, H, k); token t sits at t + 1
        kept = np.zeros((cfg.n_mem_layers, cfg.n_kv_heads))
        chance = 0.0
        for r, p in wanted:
            chance += len(p) * min(1.0, k / len(refs[r]))
            kept += torch.isin(pos[row[r]], torch.tensor(p) + 1).sum(dim=-1).numpy()
        out[k] = {"heads": (kept / total).round(4).tolist(), "chance": round(chance / total, 4)}
    return out
