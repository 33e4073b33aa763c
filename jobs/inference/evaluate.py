"""`m3 eval` and the training stage's evidence: one scoring path for "does memory help?".

    m3 eval -c configs/demo.yaml

Every mode scores the same tokens, and a result counts only beside its controls (docs/evaluation.md,
"Evaluating memory honestly"):

- **the headline** is the served memory model against the **equal-compute control**: a model
  trained from the same warmup for the same steps without memory (`bank.trained_model("control")`,
  jobs/models.py), scored on the same items and paired per item. Without that model the eval
  says the control is missing and shows the rest.
- **none** is a diagnostic, not the claim: the same weights in their own no-memory distribution
  (a model trained to read memories keeps its ref_bos sink and positions and gets zero memories,
  `model.memory.no_memories`; a model trained without memory runs plain), a state the memory
  model never trained in. RAG is scored the same way.
- **memory** follows the serving schedule: the first chunk of an item is the prompt (not
  scored) and reads what its own text retrieved; chunk c >= 1 reads what chunk c-1 retrieved,
  so no scored token chose its own memories. Eq. 6 overlap is measured against the WHOLE
  stored sequence (not the scored window), and references of the sequence's own documents are
  dropped: the bank holds held-out text verbatim. What each chunk read is in eval.json.
- **other** (another sequence's memories): what memory adds beyond "more tokens to attend to".
- **dense** reads the same references encoded on the fly with every token and no codec: the
  served bank (sparse, coded) is measured against it.
- **rag**: the references the prompt retrieved, as text before the item; rows of a batch are
  padded on the right, after their last token, so causal attention never reads a pad and each
  item scores as it would alone.
- every mode is compared with none (and with the control) per item, paired, with a standard
  error; gains and losses are weighted alike, per token (jobs/inference/stats.py).

Knowledge probe: terms whose entry no training sequence contains (held-out-only or bank-only
documents): the prompt is the headword, the definition is scored, the memories are what the
headword retrieved. Its headline row, "memory", never reads a reference of the entry's own
document (the entry itself among them) nor one overlapping the scored entry by more than
infer.max_overlap (a copy elsewhere), so only other documents can help: the same term in
another dictionary, related entries. "memory, bank holds the entry" may read the entry itself:
the look-up a bank is for, a diagnostic. QA probes (`infer.eval.probes`, facts a user brings)
are scored by jobs/inference/qa_probes.py.

Where memories come from is a store: the published bank's (`m3 eval`), or references encoded
by the model at the sparsity and codec it was trained with (the training stage's evidence,
before the bank is encoded): one function, `evaluate_items`, scores both.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from jobs.inference.eval_report import mode_lines, plot_eval, render  # noqa: F401 (m3 run renders)
from jobs.inference.stats import CONTROL, paired, paired_items, summary  # noqa: F401 (bench/ pairs models)
from storage.bank import BankError
from storage.staging import write_text_atomic


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
            queries.append(toks[: min(items.prompt(i, cs), cs)] if c == 0 else toks[(c - 1) * cs : c * cs])
            contexts.append(ctx)
            docs.append(own)
    flat = retriever.search_ids(queries, contexts, docs if exclude_own else None)
    out, i = [], 0
    for C in shape:
        out.append(flat[i : i + C])
        i += C
    return out


def rag_read(ids_i: list, prompt: int, cs: int) -> list:
    """The references RAG prepends to an item: what its prompt retrieved (the memories chunk 1
    reads; chunk 0's when the prompt is shorter than a chunk)."""
    return ids_i[min(1, len(ids_i) - 1) if prompt >= cs else 0]


@torch.no_grad()
def item_losses(
    model, items: Items, mode: str, *, sink: bool, retriever=None, ids=None, batch_size: int = 4
) -> tuple[np.ndarray, np.ndarray]:
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
            rows = group[lo : lo + batch_size]
            tokens = torch.tensor([items.tokens[i] for i in rows], dtype=torch.long, device=device)
            B, S = tokens.shape
            ctx, mem, mask, starts = tokens, None, None, None
            if mode == "rag":
                read = {i: rag_read(ids[i], p, cs) for i in rows}
                refs = retriever.ref_tokens({r for i in rows for r in read[i]})
                ctx_rows = [[t for r in read[i] for t in refs[r] + [eos]] + items.tokens[i] for i in rows]
                width = max(len(r) for r in ctx_rows)
                # padded on the right: each row starts at position 0 and its pads come after its
                # last token, where causal attention never lets a scored token look, so a row
                # scores exactly as alone (left pads would shift its positions and be attended)
                ctx = torch.tensor([r + [pad] * (width - len(r)) for r in ctx_rows], dtype=torch.long, device=device)
                starts = [len(r) - S for r in ctx_rows]
            C = -(-ctx.shape[1] // cs)
            if mode == "memory":
                mem, mask = retriever.memories([c for i in rows for c in ids[i]])
                mem = mem.reshape(B, C, *mem.shape[1:]).to(device)
                mask = mask.reshape(B, C, *mask.shape[1:]).to(device)
            elif sink:
                mem, mask = no_memories(cfg, B, C, device=device)
            logits = model(ctx, mem, mask)
            if starts is None:
                logits = logits[:, -S:]  # the item's own positions
            else:
                logits = torch.stack([logits[b, s : s + S] for b, s in enumerate(starts)])
            pred, target = logits[:, p - 1 : -1].float(), tokens[:, p:]
            losses = F.cross_entropy(
                pred.reshape(-1, pred.shape[-1]), target.reshape(-1), ignore_index=pad, reduction="none"
            ).view(B, -1)
            total[rows] = losses.sum(dim=1).cpu().numpy()
            count[rows] = (target != pad).sum(dim=1).cpu().numpy()
    return total, count


def evaluate_items(
    model, items: Items, *, sink: bool, modes: dict, retriever=None, batch_size: int = 4, control: tuple | None = None
) -> dict:
    """Score items in every mode; modes: name -> (kind, store, filters) with kind none | memory |
    other | rag, store a fetch()-able store (memory, other), filters dict(max_overlap=,
    exclude_own=). control: (model, sink) of the equal-compute control, scored without memory
    as the row CONTROL. Returns per mode its loss, what each item's chunks read ("reads") and,
    paired per item, the gain over none ("vs_none") and over the control ("vs_control")."""
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
        scores[name] = item_losses(
            model, items, "memory" if kind == "other" else kind, sink=sink, retriever=r, ids=ids, batch_size=batch_size
        )
        out[name] = summary(*scores[name])
        if ids is not None:
            out[name]["reads"] = (
                [[rag_read(row, items.prompt(i, cs), cs)] for i, row in enumerate(ids)] if kind == "rag" else ids
            )
    if control is not None:
        scores[CONTROL] = item_losses(control[0], items, "none", sink=control[1], batch_size=batch_size)
        first = [n for n in out if n == "none"]
        out = {
            **{n: out[n] for n in first},
            CONTROL: summary(*scores[CONTROL]),
            **{n: v for n, v in out.items() if n not in first},
        }
    for name in out:
        if name != "none" and "none" in scores:
            out[name]["vs_none"] = paired(scores["none"], scores[name])
        if name != CONTROL and CONTROL in scores:
            out[name]["vs_control"] = paired(scores[CONTROL], scores[name])
    return out


def _fit(rows: list, n: int) -> list:
    """rows cut or padded (with empty reads) to n chunks."""
    return rows[:n] + [[] for _ in range(n - len(rows))]


def strict(max_overlap: float | None) -> dict:
    """The held-out filters: eq. 6 against the whole sequence and the sequence's own documents."""
    return {"max_overlap": max_overlap, "exclude_own": True}


def probe_modes(max_overlap: float | None, with_memory: bool = True) -> dict:
    """The knowledge probe's modes (see the module docstring): none; "memory", the headline,
    which never reads the scored entry's document nor a reference overlapping the entry by more
    than max_overlap; and the look-up that may read the entry itself (a diagnostic)."""
    modes = {"none": ("none", None, strict(max_overlap))}
    if with_memory:
        modes["memory"] = ("memory", None, strict(max_overlap))
        modes["memory, bank holds the entry"] = ("memory", None, {"max_overlap": None, "exclude_own": False})
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
    refs = bank.dataset("refs").to_table(
        columns=["ref_id", "doc_id", "ordinal", "text", "token_ids"], filter=pc.field("ordinal") == 0
    )
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
        p = next((k for k, (a, _) in enumerate(offsets) if a > len(head) and text[a : a + 1].strip()), len(ids))
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


def run_eval(cfg, inference=None, build: str | int | None = None) -> dict:
    """Evaluate the inference checkpoint on the published bank against its controls; return (and
    print) the table. build: a published build instead of the live one (`m3 eval --build`),
    served with the model its memories were written by; written to eval-build-<N>.json."""
    from jobs.inference.engine import Inference
    from jobs.inference.qa_probes import read_probes, run_qa
    from jobs.inference.retriever import EncodingStore

    t0 = time.time()
    ec = cfg.infer.eval
    qa_sets = [(path, read_probes(path)) for path in ec.probes]  # a malformed file fails first
    inf = inference or Inference(cfg, build=build)
    bank, model = inf.bank, inf.model
    cs = model.config.mem_chunk_size
    bank.require("train_sequences", "embeddings", "memories")
    n_tokens = min(ec.tokens, model.config.max_seq_len)
    items = heldout_items(bank, cfg.train.heldout_fraction, ec.sequences, n_tokens, cs)
    retriever = inf.memory_retriever()  # refuses memories written by another model
    sink = reads_memory(inf.checkpoint)
    ctl = inf.control()
    control = (ctl["model"], ctl["sink"]) if ctl.get("model") is not None else None
    held = strict(retriever.max_overlap)
    dense = EncodingStore(model, retriever.ref_tokens)
    modes = {
        "none": ("none", None, held),
        "memory": ("memory", None, held),
        "memory, another sequence's (control)": ("other", None, held),
        "memory, dense raw (same references)": ("memory", dense, held),
        "rag": ("rag", None, held),
    }
    scored = evaluate_items(
        model, items, sink=sink, modes=modes, retriever=retriever, batch_size=ec.batch_size, control=control
    )
    results = {
        "checkpoint": str(inf.checkpoint),
        "model_hash": inf.model_hash,
        "build": ({k: inf.build[k] for k in ("build", "versions", "live")} if inf.build else "live"),
        "split": "heldout",
        "heldout_fraction": cfg.train.heldout_fraction,
        "sequences": len(items),
        "tokens_per_sequence": n_tokens,
        "max_overlap": retriever.max_overlap,
        "sink": sink,
        "served": {
            "codec": retriever.store.meta.get("codec"),
            "top_k": (retriever.store.meta.get("sparsity") or {}).get("top_k"),
        },
        "trained_to_read": inf.memory_reading,
        "control": {k: v for k, v in ctl.items() if k not in ("model", "sink")},
        "headline": (
            {"comparison": f"memory vs {CONTROL}", **scored["memory"].get("vs_control", {})}
            if control is not None
            else {"missing": ctl.get("missing")}
        ),
        "modes": scored,
    }
    probe, n_docs = probe_items(bank, inf.tokenizer, cfg.train.heldout_fraction, ec.probe_refs, model.config.eos_id)
    if len(probe):
        pmodes = probe_modes(retriever.max_overlap)
        results["probe"] = {
            "references": len(probe),
            "documents": n_docs,
            "prompts": [inf.tokenizer.decode(t[1:p]) for t, p in zip(probe.tokens, probe.prompts)],
            "modes": evaluate_items(
                model, probe, sink=sink, modes=pmodes, retriever=retriever, batch_size=ec.batch_size, control=control
            ),
        }
    else:
        results["probe"] = {
            "references": 0,
            "documents": n_docs,
            "note": "every document of the bank is in a training sequence",
        }
    results["qa"] = [
        run_qa(inf, path, qa, control=control, batch_size=ec.batch_size, seed=cfg.infer.seed) for path, qa in qa_sets
    ]
    store = retriever.store
    results["memory_cache"] = {"hits": store.hits, "misses": store.misses}
    results["seconds"] = round(time.time() - t0, 1)
    out = bank.layout.eval()
    # a pinned build's figures beside the live build's, never over them
    name = "eval" if inf.build is None else f"eval-build-{inf.build['build']}"
    write_text_atomic(out / f"{name}.json", json.dumps(results, indent=2))
    plot = plot_eval(results, out / f"{name}.png")
    if plot:
        results["plot"] = str(plot)
    print(render(results), flush=True)
    return results
