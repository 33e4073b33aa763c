"""`m3 eval` and the training stage's evidence: one scoring path for "does memory help?".

    m3 eval -c configs/demo.yaml

Every mode scores the same tokens with the same weights, and a result counts only beside its
controls (DESIGN.md, "Evaluating memory honestly"):

- **none** is the model's own no-memory distribution: a model trained to read memories keeps
  its ref_bos sink and positions and gets zero memories (`model.memory.no_memories`); a model
  trained without memory (warmup) runs plain. RAG is scored the same way.
- **memory** follows the serving schedule: the first chunk of an item is the prompt (not
  scored) and reads what its own text retrieved; chunk c >= 1 reads what chunk c-1 retrieved,
  so no scored token chose its own memories. Eq. 6 overlap is measured against the WHOLE
  stored sequence (not the scored window), and references of the sequence's own documents are
  dropped: the bank holds held-out text verbatim.
- **other** (the control): each item reads the memories retrieved for another item; what
  memory adds beyond "more tokens to attend to" is memory minus other.
- **dense** reads the same references encoded on the fly with every token and no codec: the
  served bank (sparse, coded) is measured against it.
- every mode is compared with none per item (paired), with a standard error.

Knowledge probe: terms whose entry no training sequence contains (held-out-only or bank-only
documents): the prompt is the headword, the definition is scored, the memories are what the
headword retrieved. "bank holds the entry" may read the entry itself: the look-up the bank is
for, and what RAG would do with the same retrieval; "2/3 filter" drops every reference that
overlaps the scored definition by more than 2/3 (paper §4.4 applies it to the question), so
only other documents can help: the same term in another dictionary, related entries.

Where memories come from is a store: the published bank's (`m3 eval`), or references encoded
by the model at the sparsity and codec it was trained with (the training stage's evidence,
before the bank is encoded): one function, `evaluate_items`, scores both.
"""

from __future__ import annotations

import json
import math
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from storage.bank import BankError
from storage.layout import BankLayout
from storage.staging import open_atomic, write_text_atomic


@dataclass
class Items:
    """What is scored: token lists whose first prompts[i] tokens are the prompt (not scored;
    default: the first chunk), what leakage is measured against (the whole stored sequence) and
    the documents each item comes from."""

    tokens: list[list[int]]
    contexts: list[list[int]]
    docs: list[set[str]]
    prompts: list[int] | None = None

    def __len__(self) -> int:
        return len(self.tokens)

    def prompt(self, i: int, cs: int) -> int:
        return self.prompts[i] if self.prompts is not None else cs


def reads_memory(checkpoint: str | Path) -> bool:
    """Whether a checkpoint was trained to read memories (so its no-memory baseline keeps the sink)."""
    from model.checkpoint import memory_reading

    return bool(memory_reading(checkpoint).get("reads_memory"))


def retrieval_ids(retriever, items: Items, cs: int, exclude_own: bool) -> list[list[list[str]]]:
    """ids[i][c]: the references chunk c of item i reads, on the serving schedule: chunk 0 what
    the prompt retrieved (the prompt is at most a chunk), chunk c >= 1 what chunk c-1 retrieved;
    one search for every chunk of every item."""
    queries, contexts, docs, shape = [], [], [], []
    for i, (toks, ctx, own) in enumerate(zip(items.tokens, items.contexts, items.docs)):
        C = -(-len(toks) // cs)
        shape.append(C)
        for c in range(C):
            queries.append(toks[:min(items.prompt(i, cs), cs)] if c == 0 else toks[(c - 1) * cs:c * cs])
            contexts.append(ctx)
            docs.append(own)
    flat = retriever.search_ids(queries, contexts, docs if exclude_own else None)
    out, i = [], 0
    for C in shape:
        out.append(flat[i:i + C])
        i += C
    return out


@torch.no_grad()
def item_losses(model, items: Items, mode: str, *, sink: bool, retriever=None, ids=None,
                batch_size: int = 4) -> tuple[np.ndarray, np.ndarray]:
    """Per item: the summed loss of the tokens after its prompt and their count. mode: "none",
    "memory" (ids[i][c] read from retriever.store) or "rag" (the references the prompt
    retrieved, as text before the item)."""
    from model.memory import no_memories

    cfg = model.config
    cs, eos, pad = cfg.mem_chunk_size, cfg.eos_id, cfg.pad_id
    device = next(model.parameters()).device
    total, count = np.zeros(len(items)), np.zeros(len(items), dtype=np.int64)
    by_len: dict[tuple, list[int]] = {}
    for i, t in enumerate(items.tokens):
        by_len.setdefault((len(t), items.prompt(i, cs)), []).append(i)
    for (_, p), group in by_len.items():
        for lo in range(0, len(group), batch_size):
            rows = group[lo:lo + batch_size]
            tokens = torch.tensor([items.tokens[i] for i in rows], dtype=torch.long, device=device)
            B, S = tokens.shape
            ctx, mem, mask = tokens, None, None
            if mode == "rag":  # the prompt's retrieval: what chunk 1 reads (chunk 0 when the prompt is shorter)
                read = {i: ids[i][min(1, len(ids[i]) - 1) if p >= cs else 0] for i in rows}
                refs = retriever.ref_tokens({r for i in rows for r in read[i]})
                ctx_rows = [[t for r in read[i] for t in refs[r] + [eos]] + items.tokens[i] for i in rows]
                width = max(len(r) for r in ctx_rows)
                ctx = torch.tensor([[eos] * (width - len(r)) + r for r in ctx_rows], dtype=torch.long, device=device)
            C = -(-ctx.shape[1] // cs)
            if mode == "memory":
                mem, mask = retriever.memories([c for i in rows for c in ids[i]])
                mem = mem.reshape(B, C, *mem.shape[1:]).to(device)
                mask = mask.reshape(B, C, *mask.shape[1:]).to(device)
            elif sink:
                mem, mask = no_memories(cfg, B, C, device=device)
            logits = model(ctx, mem, mask)[:, -S:]  # the item's own positions
            pred, target = logits[:, p - 1:-1].float(), tokens[:, p:]
            losses = F.cross_entropy(pred.reshape(-1, pred.shape[-1]), target.reshape(-1),
                                     ignore_index=pad, reduction="none").view(B, -1)
            total[rows] = losses.sum(dim=1).cpu().numpy()
            count[rows] = (target != pad).sum(dim=1).cpu().numpy()
    return total, count


def paired(base: tuple, other: tuple) -> dict:
    """Per item, mean loss without minus with (a positive gain helps): mean, standard error,
    how many items it helped; relative to the base's loss."""
    (tb, nb), (to, no) = base, other
    keep = (nb > 0) & (no > 0)
    d = tb[keep] / nb[keep] - to[keep] / no[keep]
    if len(d) < 2:
        return {}
    base_loss = float(tb[keep].sum() / nb[keep].sum())
    mean = statistics.fmean(d.tolist())
    se = statistics.stdev(d.tolist()) / len(d) ** 0.5
    return {"gain": round(mean, 5), "stderr": round(se, 5), "z": round(mean / se, 2) if se > 0 else None,
            "relative": round(mean / base_loss, 5), "helped": int((d > 0).sum()), "of": int(len(d))}


def _summary(total: np.ndarray, count: np.ndarray) -> dict:
    loss = float(total.sum() / max(count.sum(), 1))
    per_item = [round(float(t / n), 5) if n else None for t, n in zip(total, count)]
    return {"loss": round(loss, 4), "ppl": round(math.exp(min(loss, 50)), 2), "tokens": int(count.sum()),
            "per_item": per_item}


def paired_items(base: list, other: list) -> dict:
    """paired() over two per_item lists (mean loss per item), e.g. of two models on the same items."""
    keep = [i for i, (a, b) in enumerate(zip(base, other)) if a is not None and b is not None]
    ones = np.ones(len(keep), dtype=np.int64)
    return paired((np.array([base[i] for i in keep]), ones), (np.array([other[i] for i in keep]), ones))


def evaluate_items(model, items: Items, *, sink: bool, modes: dict, retriever=None,
                   batch_size: int = 4) -> dict:
    """Score items in every mode; modes: name -> (kind, store, filters) with kind none | memory |
    other | rag, store a fetch()-able store (memory, other), filters dict(max_overlap=,
    exclude_own=). Returns per mode its loss and, but for none, the paired gain over none."""
    cs = model.config.mem_chunk_size
    scores, retrievals, out = {}, {}, {}
    for name, (kind, store, filters) in modes.items():
        ids = None
        if kind != "none":
            key = (filters["max_overlap"], filters["exclude_own"])
            if key not in retrievals:
                r = retriever.with_filter(filters["max_overlap"])
                retrievals[key] = retrieval_ids(r, items, cs, filters["exclude_own"])
            ids = retrievals[key]
            if kind == "other":  # each item reads the memories of the item half the set away
                ids = [_fit(ids[(i + len(ids) // 2) % len(ids)], -(-len(t) // cs)) for i, t in enumerate(items.tokens)]
        r = retriever
        if store is not None:
            r = retriever.with_store(store)
        scores[name] = item_losses(model, items, "memory" if kind == "other" else kind, sink=sink,
                                   retriever=r, ids=ids, batch_size=batch_size)
        out[name] = _summary(*scores[name])
    if "none" in scores:
        for name in scores:
            if name != "none":
                out[name]["vs_none"] = paired(scores["none"], scores[name])
    return out


def _fit(rows: list, n: int) -> list:
    """rows cut or padded (with empty reads) to n chunks."""
    return rows[:n] + [[] for _ in range(n - len(rows))]


def strict(max_overlap: float | None) -> dict:
    """The held-out filters: eq. 6 against the whole sequence and the sequence's own documents."""
    return {"max_overlap": max_overlap, "exclude_own": True}


def probe_modes(max_overlap: float | None, with_memory: bool = True) -> dict:
    """The knowledge probe's modes (see the module docstring): none, the bank holding the entry,
    and the 2/3 filter (only other documents may help)."""
    modes = {"none": ("none", None, strict(max_overlap))}
    if with_memory:
        modes["memory, bank holds the entry"] = ("memory", None, {"max_overlap": None, "exclude_own": False})
        modes["memory, 2/3 filter"] = ("memory", None, {"max_overlap": max_overlap, "exclude_own": False})
    return modes


def heldout_items(bank, fraction: float, limit: int, n_tokens: int, cs: int) -> Items:
    """The first `limit` held-out sequences (never trained on), cut to n_tokens; leakage is
    measured against the whole stored sequence."""
    from pipelines.train_data import split_rows

    rows = split_rows(bank, "heldout", fraction)[:limit]
    if len(rows) == 0:
        raise BankError(f"no held-out sequences (train.heldout_fraction={fraction})")
    t = bank.dataset("train_sequences").take(np.sort(rows), columns=["token_ids", "doc_ids"])
    full, docs = t.column("token_ids").to_pylist(), t.column("doc_ids").to_pylist()
    keep = [i for i, s in enumerate(full) if min(len(s), n_tokens) > cs]
    return Items([full[i][:n_tokens] for i in keep], [full[i] for i in keep], [set(docs[i]) for i in keep])


def probe_items(bank, tokenizer, fraction: float, limit: int, eos_id: int, min_scored: int = 8) -> tuple[Items, int]:
    """A term whose entry no training sequence contains (documents only held-out sequences hold,
    and documents only the bank holds): the prompt is EOS and the entry's headword (its first
    line), the definition that follows is scored. Returns the items (at most `limit`, in
    document order) and how many such documents there are."""
    import pyarrow as pa
    import pyarrow.compute as pc

    from pipelines.train_data import heldout_mask

    t = bank.dataset("train_sequences").to_table(columns=["seq_id", "doc_ids"])
    held = heldout_mask(t.column("seq_id").to_pylist(), fraction)
    trained = set()
    for is_held, docs in zip(held, t.column("doc_ids").to_pylist()):
        if not is_held:
            trained.update(docs)
    refs = bank.dataset("refs").to_table(columns=["ref_id", "doc_id", "ordinal", "text", "token_ids"],
                                         filter=pc.field("ordinal") == 0)
    refs = refs.filter(pc.invert(pc.is_in(refs["doc_id"], value_set=pa.array(sorted(trained), pa.string()))))
    n_docs = refs.num_rows
    items = Items([], [], [], [])
    for doc, text, ids in sorted(zip(*(refs.column(c).to_pylist() for c in ("doc_id", "text", "token_ids")))):
        head = text.split("\n", 1)[0]
        enc = tokenizer.encode(text, add_special_tokens=False)
        if enc.ids != list(ids) or "\n" not in text:  # the reference's text re-tokenizes to its ids
            continue
        offsets = enc.offsets
        # the prompt ends where the definition starts: the first token past the headword and
        # the blank line after it
        p = next((k for k, (a, _) in enumerate(offsets) if a > len(head) and text[a:a + 1].strip()), len(ids))
        if len(ids) - p < min_scored or p + 1 > 64:
            continue
        toks = [eos_id] + list(ids)
        items.tokens.append(toks)
        items.contexts.append(toks)
        items.docs.append({doc})
        items.prompts.append(p + 1)
        if len(items) == limit:
            break
    return items, n_docs


def run_eval(cfg, inference=None) -> dict:
    """Evaluate the inference checkpoint on the published bank; return (and print) the table."""
    from jobs.inference.engine import Inference
    from jobs.inference.retriever import EncodingStore

    t0 = time.time()
    ec = cfg.infer.eval
    inf = inference or Inference(cfg)
    bank, model = inf.bank, inf.model
    cs = model.config.mem_chunk_size
    bank.require("train_sequences", "embeddings", "memories")
    n_tokens = min(ec.tokens, model.config.max_seq_len)
    items = heldout_items(bank, cfg.train.heldout_fraction, ec.sequences, n_tokens, cs)
    retriever = inf.memory_retriever()  # refuses memories written by another model
    sink = reads_memory(inf.checkpoint)
    held = strict(retriever.max_overlap)
    dense = EncodingStore(model, retriever.ref_tokens)
    modes = {"none": ("none", None, held), "memory": ("memory", None, held),
             "memory, another sequence's (control)": ("other", None, held),
             "memory, dense raw (same references)": ("memory", dense, held), "rag": ("rag", None, held)}
    results = {"checkpoint": str(inf.checkpoint), "model_hash": inf.model_hash, "split": "heldout",
               "heldout_fraction": cfg.train.heldout_fraction, "sequences": len(items),
               "tokens_per_sequence": n_tokens, "max_overlap": retriever.max_overlap, "sink": sink,
               "served": {"codec": retriever.store.meta.get("codec"),
                          "top_k": (retriever.store.meta.get("sparsity") or {}).get("top_k")},
               "trained_to_read": inf.memory_reading,
               "modes": evaluate_items(model, items, sink=sink, modes=modes, retriever=retriever,
                                       batch_size=ec.batch_size)}
    probe, n_docs = probe_items(bank, inf.tokenizer, cfg.train.heldout_fraction, ec.probe_refs, model.config.eos_id)
    if len(probe):
        pmodes = probe_modes(retriever.max_overlap)
        results["probe"] = {"references": len(probe), "documents": n_docs,
                            "prompts": [inf.tokenizer.decode(t[1:p]) for t, p in zip(probe.tokens, probe.prompts)],
                            "modes": evaluate_items(model, probe, sink=sink, modes=pmodes, retriever=retriever,
                                                    batch_size=ec.batch_size)}
    else:
        results["probe"] = {"references": 0, "documents": n_docs,
                            "note": "every document of the bank is in a training sequence"}
    store = retriever.store
    results["memory_cache"] = {"hits": store.hits, "misses": store.misses}
    results["seconds"] = round(time.time() - t0, 1)
    out = BankLayout(cfg.bank.uri).eval()
    write_text_atomic(out / "eval.json", json.dumps(results, indent=2))
    plot = plot_eval(results, out / "eval.png")
    if plot:
        results["plot"] = str(plot)
    print(render(results), flush=True)
    return results


def mode_lines(modes: dict) -> list[str]:
    lines = [f"  {'mode':<40}{'loss':>8}{'ppl':>9}   {'gain over none (paired)':<34}"]
    for m, v in modes.items():
        p = v.get("vs_none") or {}
        gain = (f"{p['gain']:+.4f} ± {p['stderr']:.4f} ({p['relative']:+.1%}), {p['helped']}/{p['of']}"
                if p else "")
        lines.append(f"  {m:<40}{v['loss']:>8.4f}{v['ppl']:>9.2f}   {gain}")
    return lines


def render(r: dict) -> str:
    scored = next(iter(r["modes"].values()))["tokens"]
    lines = [f"evaluation: {r['sequences']} held-out sequences (never trained on), first "
             f"{r['tokens_per_sequence']} tokens, {scored:,} scored; model {r['model_hash'][:12]} "
             f"({'sink kept' if r.get('sink') else 'plain'} without memory); own documents dropped, "
             f"eq. 6 > {r['max_overlap']} against the whole sequence dropped"]
    lines += mode_lines(r["modes"])
    served = (r["modes"].get("memory") or {}).get("vs_none") or {}
    dense = (r["modes"].get("memory, dense raw (same references)") or {}).get("vs_none") or {}
    if served and dense and dense.get("gain", 0) > 0:
        lines.append(f"  the served bank ({(r.get('served') or {}).get('top_k')} tokens per head, "
                     f"{(r.get('served') or {}).get('codec')}) keeps {served['gain'] / dense['gain']:.0%} of the "
                     f"gain of dense raw memories of the same references")
    p = r["probe"]
    if p.get("references"):
        lines.append(f"knowledge probe: {p['references']} terms whose entry no training sequence contains "
                     f"(of {p['documents']:,}); prompt = the headword, the definition scored "
                     f"({next(iter(p['modes'].values()))['tokens']:,} tokens)")
        lines += mode_lines(p["modes"])
    else:
        lines.append(f"knowledge probe: {p.get('note')}")
    if "memory_cache" in r:
        c = r["memory_cache"]
        lines.append(f"  memory cache: {c['hits']} hits, {c['misses']} misses; {r['seconds']} s")
    return "\n".join(lines)


def plot_eval(r: dict, path) -> str | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    groups = [("held-out", r["modes"])] + ([("probe", r["probe"]["modes"])] if r["probe"].get("modes") else [])
    fig, axes = plt.subplots(1, len(groups), figsize=(6 * len(groups), 3.8), squeeze=False)
    for ax, (title, modes) in zip(axes[0], groups):
        names = [m for m in modes if m != "none"]
        gains = [(modes[m].get("vs_none") or {}).get("gain", 0.0) for m in names]
        errs = [3 * (modes[m].get("vs_none") or {}).get("stderr", 0.0) for m in names]
        ax.bar(range(len(names)), gains, yerr=errs, capsize=4)
        ax.axhline(0, color="black", linewidth=0.8)
        ax.set_xticks(range(len(names)), [m.replace(", ", "\n") for m in names], fontsize=7)
        ax.set_title(f"{title}: loss without memory {modes['none']['loss']:.3f}")
        ax.set_ylabel("gain over none, nats/token (±3 SE)")
    with open_atomic(path) as f:  # a local path or a bank URI
        fig.savefig(f, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    return str(path)


def cmd_eval(cfg, args) -> int:
    run_eval(cfg)
    return 0
