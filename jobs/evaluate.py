"""`m3 eval`: held-out loss with explicit memory, without, and with RAG; and a knowledge probe.

    m3 eval -c configs/demo.yaml

Every mode scores the same tokens with the same weights, following the inference schedule so
that no scored token is used to retrieve its own memories: the first chunk of each held-out
sequence is the prompt (not scored); chunk 0 reads the memories its own text retrieves, chunk
c >= 1 those retrieved by chunk c-1 (exactly what generation does: the first generated chunk
inherits the prompt's, every later chunk uses the previous one as query). RAG prepends the
references retrieved once by the prompt. The leakage filter (infer.max_overlap, eq. 6) is
measured against the whole scored sequence: a reference that contains it is never read.

Knowledge probe: references of documents that appear only in held-out sequences (the model
never trained on them, but the bank holds them). Their loss with memory, filter off (the bank
holds the very span), with the filter on (only other references may help) and without memory.

Results: printed as a table, written to <bank>/eval/eval.json, and plotted to
<bank>/eval/eval.png when matplotlib is importable.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from storage.bank import BankError

MODES = ("none", "memory", "rag")


def _rows_of(bank, rows: np.ndarray, n_tokens: int) -> list[list[int]]:
    got = bank.dataset("train_sequences").take(np.sort(rows), columns=["token_ids"]).column("token_ids").to_pylist()
    return [t[:n_tokens] for t in got]


@torch.no_grad()
def score(inf, seqs: list[list[int]], mode: str, retriever=None) -> tuple[float, int]:
    """(sum of target losses, target count) over tokens cs.. of equally long sequences."""
    model, cs = inf.model, inf.model.config.mem_chunk_size
    tokens = torch.tensor(seqs, dtype=torch.long)
    B, S = tokens.shape
    mem = mask = None
    ctx = tokens
    if mode == "memory":
        C = -(-S // cs)
        # chunk 0 reads its own retrieval; chunk c >= 1 the one of chunk c-1
        queries = [tokens[b, max(c - 1, 0) * cs:max(c, 1) * cs] for b in range(B) for c in range(C)]
        got = retriever(queries, [tokens[b] for b in range(B) for _ in range(C)])
        mem = got.memories.reshape(B, C, *got.memories.shape[1:])
        mask = got.mask.reshape(B, C, *got.mask.shape[1:])
    elif mode == "rag":
        ids = retriever.search_ids([s[:cs] for s in seqs], seqs)
        toks = retriever.ref_tokens({x for row in ids for x in row})
        eos = model.config.eos_id
        rows = [[t for x in row for t in toks[x] + [eos]] + s for row, s in zip(ids, seqs)]
        width = max(len(r) for r in rows)
        ctx = torch.tensor([[eos] * (width - len(r)) + r for r in rows], dtype=torch.long)
    logits = model(ctx, mem, mask)[:, -S:]  # the sequence's own positions
    pred, target = logits[:, cs - 1:-1].float(), tokens[:, cs:]
    losses = F.cross_entropy(pred.reshape(-1, pred.shape[-1]), target.reshape(-1),
                             ignore_index=model.config.pad_id, reduction="sum")
    return losses.item(), int((target != model.config.pad_id).sum())


def _mean(total: float, n: int) -> dict:
    loss = total / max(n, 1)
    return {"loss": round(loss, 4), "ppl": round(math.exp(min(loss, 50)), 2), "tokens": n}


def _batches(seqs, size):
    """Batches of equal-length sequences (one tensor each)."""
    by_len: dict[int, list] = {}
    for s in seqs:
        by_len.setdefault(len(s), []).append(s)
    for group in by_len.values():
        for i in range(0, len(group), size):
            yield group[i:i + size]


def _run_modes(inf, seqs, modes: dict, batch_size: int) -> dict:
    out = {}
    for name, (mode, retriever) in modes.items():
        total, n = 0.0, 0
        for batch in _batches(seqs, batch_size):
            t, k = score(inf, batch, mode, retriever)
            total, n = total + t, n + k
        out[name] = _mean(total, n)
    return out


def probe_refs(bank, fraction: float, limit: int, min_tokens: int) -> tuple[list[list[int]], int]:
    """Token ids of references from documents only held-out sequences contain; and how many
    such documents there are."""
    from pipelines.train_data import heldout_mask

    t = bank.dataset("train_sequences").to_table(columns=["seq_id", "doc_ids"])
    held = heldout_mask(t.column("seq_id").to_pylist(), fraction)
    seen, heldout_docs = set(), set()
    for is_held, docs in zip(held, t.column("doc_ids").to_pylist()):
        (heldout_docs if is_held else seen).update(docs)
    only = sorted(heldout_docs - seen)
    if not only or limit == 0:
        return [], len(only)
    import pyarrow.compute as pc

    refs = bank.dataset("refs").to_table(columns=["ref_id", "token_ids"], filter=pc.field("doc_id").isin(only))
    pairs = sorted(zip(refs.column("ref_id").to_pylist(), refs.column("token_ids").to_pylist()))
    return [ids for _, ids in pairs if len(ids) >= min_tokens][:limit], len(only)


def run_eval(cfg, inference=None) -> dict:
    """Evaluate the inference checkpoint; return (and print) the results table."""
    from jobs.inference import Inference
    from pipelines.train_data import split_rows

    t0 = time.time()
    ec = cfg.infer.eval
    inf = inference or Inference(cfg)
    bank, cs = inf.bank, inf.model.config.mem_chunk_size
    bank.require("train_sequences", "embeddings", "memories")
    n_tokens = min(ec.tokens, inf.model.config.max_seq_len)
    rows = split_rows(bank, "heldout", cfg.train.heldout_fraction)
    if len(rows) == 0:
        raise BankError(f"no held-out sequences (train.heldout_fraction={cfg.train.heldout_fraction})")
    seqs = [s for s in _rows_of(bank, rows[:ec.sequences], n_tokens) if len(s) > cs]
    filtered = inf.memory_retriever()  # refuses memories written by another model
    modes = {"none": ("none", None), "memory": ("memory", filtered), "rag": ("rag", filtered)}
    results = {"checkpoint": str(inf.checkpoint), "model_hash": inf.model_hash, "split": "heldout",
               "heldout_fraction": cfg.train.heldout_fraction, "sequences": len(seqs),
               "tokens_per_sequence": n_tokens, "max_overlap": filtered.max_overlap,
               "modes": _run_modes(inf, seqs, modes, ec.batch_size)}
    probe, n_docs = probe_refs(bank, cfg.train.heldout_fraction, ec.probe_refs, cs + 1)
    if probe:
        items = [[inf.model.config.eos_id] + ids for ids in probe]
        pmodes = {"none": ("none", None), "memory, bank holds the span": ("memory", filtered.with_filter(None)),
                  "memory, overlap-filtered": ("memory", filtered)}
        results["probe"] = {"references": len(items), "documents": n_docs,
                            "modes": _run_modes(inf, items, pmodes, ec.batch_size)}
    else:
        results["probe"] = {"references": 0, "documents": n_docs,
                            "note": "no document appears only in held-out sequences"}
    store = inf.store()
    results["memory_cache"] = {"hits": store.hits, "misses": store.misses}
    results["seconds"] = round(time.time() - t0, 1)
    out = Path(cfg.bank.uri) / "eval"
    out.mkdir(parents=True, exist_ok=True)
    (out / "eval.json").write_text(json.dumps(results, indent=2))
    plot = plot_eval(results, out / "eval.png")
    if plot:
        results["plot"] = str(plot)
    print(render(results), flush=True)
    return results


def render(r: dict) -> str:
    scored = next(iter(r["modes"].values()))["tokens"]
    lines = [f"evaluation: {r['sequences']} held-out sequences (never trained on), first "
             f"{r['tokens_per_sequence']} tokens, {scored:,} scored; model {r['model_hash'][:12]}",
             f"  {'mode':<34}{'loss':>8}{'ppl':>10}"]
    lines += [f"  {m:<34}{v['loss']:>8.4f}{v['ppl']:>10.2f}" for m, v in r["modes"].items()]
    p = r["probe"]
    if p.get("references"):
        lines.append(f"knowledge probe: {p['references']} references of {p['documents']} document(s) "
                     f"only held-out sequences contain ({next(iter(p['modes'].values()))['tokens']:,} scored)")
        lines += [f"  {m:<34}{v['loss']:>8.4f}{v['ppl']:>10.2f}" for m, v in p["modes"].items()]
    else:
        lines.append(f"knowledge probe: {p.get('note')}")
    c = r["memory_cache"]
    lines.append(f"  memory cache: {c['hits']} hits, {c['misses']} misses; {r['seconds']} s")
    return "\n".join(lines)


def plot_eval(r: dict, path: Path) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    groups = [("held-out", r["modes"])] + ([("probe", r["probe"]["modes"])] if r["probe"].get("modes") else [])
    fig, axes = plt.subplots(1, len(groups), figsize=(5 * len(groups), 3.5), squeeze=False)
    for ax, (title, modes) in zip(axes[0], groups):
        losses = [v["loss"] for v in modes.values()]
        bars = ax.bar(range(len(modes)), losses)
        ax.bar_label(bars, fmt="%.3f", fontsize=8)
        # differences between modes are small next to the loss itself: do not start at zero
        span = max(losses) - min(losses)
        ax.set_ylim(min(losses) - max(span, 0.05), max(losses) + max(span, 0.05) * 0.5)
        ax.set_xticks(range(len(modes)), [m.replace(", ", "\n") for m in modes], fontsize=8)
        ax.set_title(title)
        ax.set_ylabel("loss per token")
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return path


def cmd_eval(cfg, args) -> int:
    run_eval(cfg)
    return 0
