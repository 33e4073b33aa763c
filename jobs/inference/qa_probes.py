"""Knowledge QA probes (`infer.eval.probes`): facts a user brings, scored by `m3 eval`.

A probe file is JSONL, one item a line (blank lines skipped; other keys are kept out of the way):

    {"prompt": "Q: When was Brakon Teld born?\nA:", "answer": " 1842", "source_ids": ["e000123"]}

`source_ids` (optional) are corpus record ids (`corpus.id_key`, else the line or row number) of
the documents that hold the answer. A record id names a document through the `documents` table
(`doc_id` hashes the file's name and the record id, so the table's `source_id` column is how it
is found; a duplicate dropped by dedup stands for the copy kept, `rejects.duplicate_of`), and a
document's knowledge is its references, `<doc_id>-<ordinal>`. A malformed line is a one-line
error naming file:line and what is wrong.

Each item is scored on the generation schedule (model/generation.py): the prompt behind EOS, its
chunks reading what their own text retrieved, the answer reading the last prompt chunk's
memories (and, past a chunk, what the answer's previous chunk retrieved). Scored: the
answer-token loss (teacher forcing, `score_continuation`) and greedy exact match (len(answer
tokens) tokens decoded greedily by `generate_with_memory`, compared with the answer's tokens),
with the references each item's answer read, in every mode:

- none: the same weights without memory (the ref_bos sink kept for a model trained with it);
- equal-compute control: the model trained the same steps without memory, when there is one;
- memory: what the prompt retrieved from the served bank (the overlap filter on, as served);
- memory, the source's own (oracle): the source documents' references from the bank's memories
  table (at most mems_per_chunk, the model's reading width: those closest to the prompt);
  items without a source in the bank are not scored in this mode;
- memory, random references: mems_per_chunk references drawn at random (seeded; never the
  source's), what "more tokens to attend to" gives without the knowledge;
- rag: the references the memory mode's answer read, as text before the prompt (the same
  references, read as text instead of as memories; each context scored at its own length).

Every mode is paired per item with none (and the control) like `m3 eval`'s other modes: the
token-weighted loss gain with its standard error, and the exact-match difference with its own.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from jobs.config import ConfigError
from jobs.inference.stats import CONTROL, paired, paired_rates, summary
from model.generation import Retrieved, generate_with_memory, score_continuation

MEMORY, ORACLE, RANDOM = "memory", "memory, the source's own (oracle)", "memory, random references"


@dataclass(frozen=True)
class Probe:
    prompt: str
    answer: str
    source_ids: tuple[str, ...]
    line: int


def read_probes(path: str) -> list[Probe]:
    """The items of a probe file; ConfigError `file:line: what is wrong` at the first bad line."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"infer.eval.probes: no such file {path}")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text (byte {e.start}: {e.reason})") from None
    out = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}:{n}"
        try:
            item = json.loads(line)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{where}: not valid JSON ({e.msg}, column {e.colno})") from None
        if not isinstance(item, dict):
            raise ConfigError(f"{where}: expected a JSON object with 'prompt' and 'answer', got {type(item).__name__}")
        for key in ("prompt", "answer"):
            if key not in item:
                raise ConfigError(f"{where}: no '{key}' (each line needs 'prompt' and 'answer')")
            if not isinstance(item[key], str) or not item[key].strip():
                raise ConfigError(f"{where}: '{key}' must be a non-empty string, got {json.dumps(item[key])[:60]}")
        src = item.get("source_ids")
        src = [] if src is None else src
        if not isinstance(src, list) or not all(
            (isinstance(x, str) and x) or (isinstance(x, int) and not isinstance(x, bool)) for x in src
        ):
            raise ConfigError(
                f"{where}: 'source_ids' must be a list of record ids (strings), got "
                f"{json.dumps(item.get('source_ids'))[:60]}"
            )
        out.append(Probe(item["prompt"], item["answer"], tuple(str(x) for x in src), n))
    if not out:
        raise ConfigError(f"{path}: holds no probe items (one JSON object a line)")
    return out


def source_refs(bank, source_ids) -> dict[str, list[tuple[str, str]]]:
    """record id -> [(ref_id, text)] of the document holding it (the kept copy's for a dedup
    duplicate), in document order; record ids the bank holds no reference of are absent."""
    import pyarrow as pa
    import pyarrow.compute as pc

    ids = pa.array(sorted(set(source_ids)), pa.string())
    if not len(ids):
        return {}
    docs: dict[str, set[str]] = {}
    t = bank.dataset("documents").to_table(columns=["doc_id", "source_id"], filter=pc.field("source_id").isin(ids))
    for d, s in zip(t.column("doc_id").to_pylist(), t.column("source_id").to_pylist()):
        docs.setdefault(s, set()).add(d)
    if bank.has("rejects"):
        dup = pc.field("source_id").isin(ids) & pc.field("duplicate_of").is_valid()
        t = bank.dataset("rejects").to_table(columns=["source_id", "duplicate_of"], filter=dup)
        for s, d in zip(t.column("source_id").to_pylist(), t.column("duplicate_of").to_pylist()):
            docs.setdefault(s, set()).add(d)
    wanted = pa.array(sorted({d for ds in docs.values() for d in ds}), pa.string())
    t = bank.dataset("refs").to_table(
        columns=["ref_id", "doc_id", "ordinal", "text"], filter=pc.field("doc_id").isin(wanted)
    )
    by_doc: dict[str, list] = {}
    for r, d, o, x in sorted(
        zip(*(t.column(c).to_pylist() for c in ("ref_id", "doc_id", "ordinal", "text"))),
        key=lambda row: (row[1], row[2]),
    ):
        by_doc.setdefault(d, []).append((r, x))
    out = {}
    for s, ds in docs.items():
        refs = [ref for d in sorted(ds) for ref in by_doc.get(d, [])]
        if refs:
            out[s] = refs
    return out


class FixedReads:
    """A BatchRetriever (model.generation) that answers every query of batch row b with the
    same references, read from the bank's memories: the oracle's and the random control's."""

    def __init__(self, retriever, rows: list[list[str]]):
        self.retriever, self.rows = retriever, rows

    def __call__(self, queries, contexts) -> Retrieved:
        per = len(queries) // len(self.rows)
        ids = [list(self.rows[q // per]) for q in range(len(queries))]
        mems, mask = self.retriever.memories(ids)
        return Retrieved(mems, mask, ids)


@torch.no_grad()
def score(
    model,
    contexts: list[list[int]],
    answers: list[list[int]],
    *,
    sink: bool,
    rows=None,
    retrieve=None,
    batch_size: int = 8,
) -> dict:
    """Each item's answer after its context: summed loss, tokens, exact match, the greedy tokens
    and the references the answer read. Items of one context and answer length are batched
    (never padded); rows: the items to score (default all; the others are left unscored);
    retrieve(items) -> the BatchRetriever for a batch of them, or None."""
    n = len(contexts)
    out = {
        "total": np.zeros(n),
        "count": np.zeros(n, dtype=np.int64),
        "exact": [None] * n,
        "greedy": [None] * n,
        "reads": [[] for _ in range(n)],
    }
    device = next(model.parameters()).device
    groups: dict[tuple, list[int]] = {}
    for i in range(n) if rows is None else rows:
        groups.setdefault((len(contexts[i]), len(answers[i])), []).append(i)
    for (_, A), group in groups.items():
        for lo in range(0, len(group), batch_size):
            batch = group[lo : lo + batch_size]
            prompt = torch.tensor([contexts[i] for i in batch], dtype=torch.long, device=device)
            answer = torch.tensor([answers[i] for i in batch], dtype=torch.long, device=device)
            r = retrieve(batch) if retrieve is not None else None
            losses, _, reads = score_continuation(model, prompt, answer, r, sink=sink)
            greedy = generate_with_memory(model, prompt, A, r, sink=sink).tokens[:, prompt.shape[1] :]
            for b, i in enumerate(batch):
                out["total"][i], out["count"][i] = float(losses[b].sum()), A
                out["exact"][i] = bool(torch.equal(greedy[b], answer[b]))
                out["greedy"][i], out["reads"][i] = greedy[b].tolist(), reads[b]
    return out


def tokenize(tokenizer, eos_id: int, probe: Probe) -> tuple[list[int], list[int]]:
    """The prompt behind EOS (a prompt starts a document) and the answer's tokens as they follow
    it in the text (the answer alone where the two would merge across the boundary)."""
    p = tokenizer.encode(probe.prompt).ids
    full = tokenizer.encode(probe.prompt + probe.answer).ids
    a = full[len(p) :] if full[: len(p)] == p and len(full) > len(p) else tokenizer.encode(probe.answer).ids
    return [eos_id] + p, a


def run_qa(inf, path: str, probes: list[Probe], *, control=None, batch_size: int = 8, seed: int = 0) -> dict:
    """Score one probe file in every mode (the module docstring) with the served model and bank;
    control: (model, sink) of the equal-compute control, or None."""
    model, tok = inf.model, inf.tokenizer
    mc = model.config
    M = mc.mems_per_chunk
    sink = bool(inf.memory_reading.get("reads_memory"))
    prompts, answers = zip(*(tokenize(tok, mc.eos_id, p) for p in probes))
    for p, c, a in zip(probes, prompts, answers):
        if len(c) + len(a) > mc.max_seq_len:
            raise ConfigError(
                f"{path}:{p.line}: the prompt and answer are {len(c) + len(a)} tokens, more than the "
                f"model's max_seq_len={mc.max_seq_len}"
            )
    retriever = inf.memory_retriever()
    found = source_refs(inf.bank, {s for p in probes for s in p.source_ids})
    sources = [[ref for s in p.source_ids for ref in found.get(s, [])] for p in probes]
    oracle = _closest(retriever, [p.prompt for p in probes], sources, M)
    own = [{r for r, _ in refs} for refs in sources]
    runs = {"none": score(model, prompts, answers, sink=sink, batch_size=batch_size)}
    if control is not None:
        runs[CONTROL] = score(control[0], prompts, answers, sink=control[1], batch_size=batch_size)
    runs[MEMORY] = score(model, prompts, answers, sink=sink, retrieve=lambda rows: retriever, batch_size=batch_size)
    with_source = [i for i, o in enumerate(oracle) if o]
    runs[ORACLE] = score(
        model,
        prompts,
        answers,
        sink=sink,
        rows=with_source,
        batch_size=batch_size,
        retrieve=lambda rows: FixedReads(retriever, [oracle[i] for i in rows]),
    )
    drawn = _random_refs(inf.bank, own, M, seed)
    runs[RANDOM] = score(
        model,
        prompts,
        answers,
        sink=sink,
        batch_size=batch_size,
        retrieve=lambda rows: FixedReads(retriever, [drawn[i] for i in rows]),
    )
    rag_ids = [list(r[0]) if r else [] for r in runs[MEMORY]["reads"]]  # what the answer's first chunk read
    texts = retriever.ref_tokens({r for row in rag_ids for r in row})
    contexts = []
    for i, ids in enumerate(rag_ids):
        while ids and sum(len(texts[r]) + 1 for r in ids) + len(prompts[i]) + len(answers[i]) > mc.max_seq_len:
            ids.pop()  # what does not fit before the prompt is left out
        contexts.append([t for r in ids for t in texts[r] + [mc.eos_id]] + prompts[i])
    runs["rag"] = score(model, contexts, answers, sink=sink, batch_size=batch_size)
    runs["rag"]["reads"] = [[ids] for ids in rag_ids]
    modes = {}
    for name, r in runs.items():
        m = summary(r["total"], r["count"])
        scored = [e for e in r["exact"] if e is not None]
        m.update(
            {
                "exact_match": round(sum(scored) / len(scored), 4) if scored else None,
                "exact": r["exact"],
                "greedy": [tok.decode(g) if g is not None else None for g in r["greedy"]],
                "reads": r["reads"],
            }
        )
        if name not in ("none", CONTROL):
            m["read_source"] = sum(1 for i, rd in enumerate(r["reads"]) if own[i] & {x for c in rd for x in c})
        if name != "none":
            m["vs_none"] = paired((runs["none"]["total"], runs["none"]["count"]), (r["total"], r["count"]))
            m["exact_vs_none"] = paired_rates(runs["none"]["exact"], r["exact"])
        if control is not None and name != CONTROL:
            m["vs_control"] = paired((runs[CONTROL]["total"], runs[CONTROL]["count"]), (r["total"], r["count"]))
            m["exact_vs_control"] = paired_rates(runs[CONTROL]["exact"], r["exact"])
        modes[name] = m
    missing = sorted({s for p in probes for s in p.source_ids} - set(found))
    return {
        "file": str(path),
        "items": len(probes),
        "lines": [p.line for p in probes],
        "answer_tokens": int(sum(len(a) for a in answers)),
        "answer_lengths": [len(a) for a in answers],
        "with_sources": len(with_source),
        "source_ids_not_in_bank": missing[:20],
        "n_source_ids_not_in_bank": len(missing),
        "modes": modes,
    }


def _closest(retriever, prompts: list[str], sources: list[list[tuple[str, str]]], k: int) -> list[list[str]]:
    """Per item, its source references (all of them when they fit the model's k memories a
    chunk, else the k closest to the prompt by the retriever's `retrieval.method`, best first,
    as serving ranks; sources BM25 leaves out, sharing no word with the prompt, follow in order)."""
    from storage.lexical import retrieve

    out = []
    for prompt, refs in zip(prompts, sources):
        if len(refs) <= k:
            out.append([r for r, _ in refs])
            continue

        def dense(texts: list[str], n: int, refs=refs) -> list[list[tuple[str, float]]]:
            vecs = retriever.embedder.embed(texts + [x for _, x in refs])
            sims = vecs[1:] @ vecs[0]
            return [[(refs[j][0], float(sims[j])) for j in np.argsort(-sims, kind="stable")[:n]]]

        hits = retrieve(
            retriever.method, [prompt], k, table=retriever.table, vector_hits=dense, among=[[r for r, _ in refs]]
        )[0]
        ids = [r for r, _ in hits]
        out.append((ids + [r for r, _ in refs if r not in ids])[:k])
    return out


def _random_refs(bank, own: list[set[str]], k: int, seed: int) -> list[list[str]]:
    """Per item, k references drawn at random from the bank (seeded), none of its sources'."""
    ids = bank.dataset("refs").to_table(columns=["ref_id"]).column("ref_id").to_pylist()
    rng = np.random.default_rng(seed)
    out = []
    for mine in own:
        pool = rng.choice(len(ids), size=min(len(ids), k + len(mine)), replace=False)
        out.append([ids[j] for j in pool if ids[j] not in mine][:k])
    return out
