"""Next-token choice: greedy, temperature, nucleus (top-p), with one random stream per row.

One generator per row (not one for the batch) so that a seeded prompt samples the same tokens
whether it is generated alone or inside a batch: batching is a speed decision and must not
change what a prompt produces.
"""

from __future__ import annotations

import torch
from torch import Tensor


def row_generators(seeds: list[int], device="cpu") -> list[torch.Generator]:
    return [torch.Generator(device=device).manual_seed(int(s)) for s in seeds]


def top_p_filter(logits: Tensor, top_p: float) -> Tensor:
    """Logits with every token outside the smallest set of probability mass >= top_p set to
    -inf (the most likely token always stays)."""
    if top_p >= 1.0:
        return logits
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    probs = sorted_logits.softmax(dim=-1)
    # mass strictly before each token: a token is kept while what precedes it is < top_p
    before = probs.cumsum(dim=-1) - probs
    drop_sorted = before >= top_p
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def sample(
    logits: Tensor, temperature: float = 0.0, top_p: float = 1.0, generators: list[torch.Generator] | None = None
) -> Tensor:
    """logits (B, V) -> tokens (B, 1) int64. temperature 0 is greedy (no randomness used)."""
    if temperature < 0 or not 0 < top_p <= 1:
        raise ValueError(f"need temperature >= 0 and 0 < top_p <= 1, got {temperature}, {top_p}")
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    probs = top_p_filter(logits.float() / temperature, top_p).softmax(dim=-1)
    if generators is None:
        return torch.multinomial(probs, 1)
    if len(generators) != probs.shape[0]:
        raise ValueError(f"{len(generators)} generators for {probs.shape[0]} rows")
    return torch.cat([torch.multinomial(p[None], 1, generator=g) for p, g in zip(probs, generators)])
