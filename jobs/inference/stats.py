"""The statistics of `m3 eval`: a mode's loss and the paired difference of two modes.

One weighting everywhere: a loss is per token over every scored token, and a paired gain is
the token-weighted mean of the per-item differences, so a gain is exactly the difference of the
two losses displayed beside it (items of unequal length weigh by their tokens in both). Its
standard error is the ratio estimator's over items (the items are the independent units).
"""

from __future__ import annotations

import math

import numpy as np

# the row of the equal-compute control: a model trained from the same warmup for the same steps
# without memory (`m3 eval`'s headline compares the memory model with it)
CONTROL = "equal-compute control"


def paired(base: tuple, other: tuple) -> dict:
    """Per item, mean loss of `base` minus that of `other` (a positive gain: `other` is better),
    weighted by the item's scored tokens: mean, standard error, z, relative to the base's loss,
    how many items it helped. Items scored in only one of the two are left out of both."""
    (tb, nb), (to, no) = base, other
    tb, nb, to, no = (np.asarray(x, dtype=np.float64) for x in (tb, nb, to, no))
    keep = (nb > 0) & (no > 0)
    if keep.sum() < 2:
        return {}
    w = nb[keep]
    d = tb[keep] / w - to[keep] / no[keep]
    mean = float((w * d).sum() / w.sum())
    n = len(d)
    se = float(math.sqrt((w**2 * (d - mean) ** 2).sum() * n / (n - 1)) / w.sum())
    base_loss = float(tb[keep].sum() / w.sum())
    return {
        "gain": round(mean, 5),
        "stderr": round(se, 5),
        "z": round(mean / se, 2) if se > 0 else None,
        "relative": round(mean / base_loss, 5) if base_loss else None,
        "helped": int((d > 0).sum()),
        "of": int(n),
    }


def paired_items(base: list, other: list, tokens: list | None = None) -> dict:
    """paired() over two per_item lists (mean loss per item), e.g. of two models on the same
    items; `tokens` weighs each item (default: equally, as for items of one length)."""
    keep = [i for i, (a, b) in enumerate(zip(base, other)) if a is not None and b is not None]
    w = np.array([tokens[i] for i in keep] if tokens is not None else [1] * len(keep), dtype=np.float64)
    return paired((np.array([base[i] for i in keep]) * w, w), (np.array([other[i] for i in keep]) * w, w))


def paired_rates(base: list, other: list) -> dict:
    """Per item 0/1 outcomes (exact match): mean of other minus base (positive: `other` gets more
    right), its standard error and how many items changed each way."""
    keep = [i for i, (a, b) in enumerate(zip(base, other)) if a is not None and b is not None]
    if len(keep) < 2:
        return {}
    d = np.array([float(other[i]) - float(base[i]) for i in keep])
    mean, se = float(d.mean()), float(d.std(ddof=1) / math.sqrt(len(d)))
    return {
        "gain": round(mean, 4),
        "stderr": round(se, 4),
        "gained": int((d > 0).sum()),
        "lost": int((d < 0).sum()),
        "of": len(keep),
    }


def summary(total: np.ndarray, count: np.ndarray) -> dict:
    """A mode's loss per scored token, its perplexity and each item's mean loss."""
    loss = float(total.sum() / max(count.sum(), 1))
    per_item = [round(float(t / n), 5) if n else None for t, n in zip(total, count)]
    return {
        "loss": round(loss, 4),
        "ppl": round(math.exp(min(loss, 50)), 2),
        "tokens": int(count.sum()),
        "per_item": per_item,
    }
