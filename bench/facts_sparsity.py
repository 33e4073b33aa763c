"""Sparsity where it matters (issue 24, part 6): on the facts QA probe, how many of the answer's
tokens each memory head keeps, and what the gain is at 8..128 tokens per head x raw/int8/vq.

    nice -n 10 .venv/bin/python bench/facts_sparsity.py -c configs/facts.yaml --set bank.uri=/tmp/editbank

With the served model of a trained facts bank (`m3 run -c configs/facts.yaml`; --build N: a
published build and its model) and the config's first probe file (infer.eval.probes; --items N of its items, drawn with --seed, 0 = all):

(i) answer tokens kept. A memory keeps, per memory layer and KV head, the top-k tokens of its
    reference by w_j = sum_i exp(q_i . k_j / sqrt(D)) over the reference's tokens i (no causal
    mask, no positions; the query heads sharing a KV head summed: model.score_combine), ref_bos
    never kept (model/memory.py encode_references). For each item, the answer's tokens in its
    source's reference (the tokens whose characters overlap a whole-word occurrence of the
    answer in the reference's text), and per (layer, head) and k the share of them that head
    keeps, token-weighted over items; "chance": the share a random choice of k tokens keeps
    (k / the reference's length, at most 1).
(ii) the gain. Every k x codec: the references re-encoded on the fly by the model at that k
    (jobs/inference/retriever.py EncodingStore) and passed through the codec (CodedStore; raw =
    float32; vq: the bank's quantizer, or one trained as `m3 encode` trains the bank's, the same
    for every k: `quantizer`). Scored like `m3 eval`'s QA probe
    (jobs/inference/qa_probes.py score): answer-token loss and greedy exact match against none
    (the same weights without memory), paired per item, for "memory" (what the prompt retrieved,
    searched once) and "oracle" (the source's own references), and the share of the dense gain
    (k = ref_max_tokens, raw) each keeps.

Prints two markdown tables and returns (--json: writes) the figures. A model that does not read
its memories gives a smoke test of this tooling, not a finding: say so beside its numbers.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the project's model/, not bench/model.py

import numpy as np  # noqa: E402

KS = (8, 16, 32, 64, 128)
CODECS = ("raw", "int8", "vq")


class Searched:
    """A BatchRetriever that searches each distinct (query, context) once, then reads the ids'
    memories from whatever store it is given: every k x codec reads what the prompt retrieved."""

    def __init__(self, retriever):
        self.retriever, self.store, self.cache = retriever, None, {}

    def __call__(self, queries, contexts):
        from model.generation import Retrieved

        keys = [(tuple(q.tolist()), tuple(c.tolist())) for q, c in zip(queries, contexts)]
        todo = [k for k in dict.fromkeys(keys) if k not in self.cache]
        if todo:
            for k, row in zip(todo, self.retriever.search_ids([list(q) for q, _ in todo], [list(c) for _, c in todo])):
                self.cache[k] = row
        ids = [self.cache[k] for k in keys]
        mems, mask = self.retriever.with_store(self.store).memories(ids)
        return Retrieved(mems, mask, ids)


def quantizer(cfg, inf, retriever):
    """One VQ codec for every k: the bank's own where the bank is vq, else one trained as `m3
    encode --set encode.codec=vq` trains the bank's: on the memories, at the model's mem_top_k and
    every slot (empty ones too), of a uniform sample of encode.vq_train_refs references seeded by
    encode.seed. A top-k memory's vectors are some of its dense memory's (the kept tokens' K and
    V), so one quantizer serves every k, as one serves a bank; training one per k cost ~95 s each
    on 2 cores for nothing the table needs."""
    from jobs.inference.retriever import EncodingStore
    from model.codecs import VQCodec, make_codec

    meta = inf.bank.metadata("memories")
    if meta.get("codec") == "vq" and meta.get("quantizer_path"):
        return make_codec("vq", quantizer=meta["quantizer_path"], quantizer_hash=meta["quantizer_hash"]), "the bank's"
    ids = inf.bank.dataset("refs").to_table(columns=["ref_id"]).column("ref_id").to_pylist()
    rng = np.random.default_rng(cfg.encode.seed)
    sample = [ids[j] for j in sorted(rng.choice(len(ids), min(len(ids), cfg.encode.vq_train_refs), replace=False))]
    k = inf.model.config.mem_top_k
    mems, _ = EncodingStore(inf.model, retriever.ref_tokens, top_k=k).fetch(sample)
    return (
        VQCodec.train(mems, spec=cfg.encode.vq_spec, seed=cfg.encode.seed),
        f"trained on the top-{k} memories of {len(sample)} references",
    )


def run(
    config: str,
    overrides: list[str],
    items: int = 200,
    seed: int = 0,
    ks=KS,
    codecs=CODECS,
    batch_size: int = 8,
    build: str | None = None,
) -> dict:
    from jobs.config import load_config
    from jobs.inference.engine import Inference
    from jobs.inference.qa_probes import FixedReads, _closest, read_probes, score, source_refs, tokenize
    from jobs.inference.retriever import CodedStore, EncodingStore
    from jobs.inference.sparsity import answer_positions, kept_shares
    from jobs.inference.stats import paired, paired_rates, summary
    from model.codecs import make_codec

    t0 = time.time()
    cfg = load_config(config, overrides)
    path = cfg.infer.eval.probes[0]
    probes = read_probes(path)
    if items:
        probes = sorted(random.Random(seed).sample(probes, min(items, len(probes))), key=lambda p: p.line)
    inf = Inference(cfg, build=build)
    model, tok = inf.model, inf.tokenizer
    mc = model.config
    ks = [min(k, mc.ref_max_tokens) for k in ks]
    sink = bool(inf.memory_reading.get("reads_memory"))
    retriever = inf.memory_retriever()
    prompts, answers = zip(*(tokenize(tok, mc.eos_id, p) for p in probes))
    found = source_refs(inf.bank, {s for p in probes for s in p.source_ids})
    sources = [[ref for s in p.source_ids for ref in found.get(s, [])] for p in probes]
    oracle = _closest(retriever, [p.prompt for p in probes], sources, mc.mems_per_chunk)

    # (i) which of the answer's tokens each head keeps, in the source's references
    tokens = retriever.ref_tokens({r for refs in sources for r, _ in refs})
    wanted, skipped, found_in = [], set(), set()
    for i, (p, row) in enumerate(zip(probes, sources)):
        for r, x in row:
            pos = answer_positions(tok, x, tokens[r], p.answer)
            if pos is None:
                skipped.add(i)
            elif pos:
                wanted.append((r, pos))
                found_in.add(i)
    lengths = [len(tokens[r]) for r, _ in wanted]
    kept = kept_shares(model, tokens, wanted, ks) if wanted else {}
    t1 = time.time()

    # (ii) the gain at each k x codec, memory (retrieved) and oracle, against none
    runs = {"none": score(model, prompts, answers, sink=sink, batch_size=batch_size)}
    searched = Searched(retriever)
    with_source = [i for i, o in enumerate(oracle) if o]
    vq, vq_note = quantizer(cfg, inf, retriever) if "vq" in codecs else (None, None)
    t2 = time.time()
    rows = []
    for k in ks:
        raw = EncodingStore(model, retriever.ref_tokens, top_k=k)
        for name in codecs:
            store = raw if name == "raw" else CodedStore(raw, vq if name == "vq" else make_codec(name))
            searched.store = store
            mem = score(model, prompts, answers, sink=sink, batch_size=batch_size, retrieve=lambda rows: searched)
            orc = score(
                model,
                prompts,
                answers,
                sink=sink,
                batch_size=batch_size,
                rows=with_source,
                retrieve=lambda rows: FixedReads(retriever.with_store(store), [oracle[i] for i in rows]),
            )
            shape = (mc.n_mem_layers, 2, mc.n_kv_heads, k, mc.head_dim)
            row = {
                "top_k": k,
                "codec": name,
                "bytes_per_reference": (store.codec if name != "raw" else make_codec("raw-fp32")).nbytes(shape),
            }
            for mode, r in (("memory", mem), ("oracle", orc)):
                scored = [e for e in r["exact"] if e is not None]
                row[mode] = {
                    **summary(r["total"], r["count"]),
                    "exact_match": round(sum(scored) / len(scored), 4),
                    "vs_none": paired((runs["none"]["total"], runs["none"]["count"]), (r["total"], r["count"])),
                    "exact_vs_none": paired_rates(runs["none"]["exact"], r["exact"]),
                }
                row[mode].pop("per_item", None)
            rows.append(row)
            print(
                f"[facts_sparsity] top-{k} {name}: memory {row['memory']['vs_none']}, oracle {row['oracle']['vs_none']}",
                flush=True,
            )
    none = runs["none"]
    out = {
        "bank": cfg.bank.uri,
        "build": (inf.build or {}).get("build", "live"),
        "probe": path,
        "items": len(probes),
        "with_source": len(with_source),
        "model_hash": inf.model_hash[:12],
        "reads_memory": sink,
        "served": inf.memory_reading,
        "none": {
            "loss": summary(none["total"], none["count"])["loss"],
            "exact_match": round(sum(bool(e) for e in none["exact"]) / len(probes), 4),
        },
        "answer_tokens": {
            "items": len(found_in),
            "tokens": sum(len(p) for _, p in wanted),
            "not_found": len(probes) - len(found_in | skipped),
            "not_retokenized": len(skipped - found_in),
            "reference_tokens": {
                "mean": round(float(np.mean(lengths)), 1) if lengths else None,
                "max": max(lengths, default=None),
            },
            "kept": kept,
        },
        "gain": rows,
        "vq": vq_note,
        "seconds": {"kept": round(t1 - t0, 1), "vq": round(t2 - t1, 1), "gain": round(time.time() - t2, 1)},
    }
    print(render(out, mc))
    return out


def render(r: dict, mc) -> str:
    a = r["answer_tokens"]
    ks = list(a["kept"])
    lines = [
        f"facts sparsity on {r['bank']} (build {r['build']}): {r['items']} items of {r['probe']}, model {r['model_hash']}"
        f"{'' if r['reads_memory'] else ' (NOT trained to read memories: a smoke test)'}",
        "",
        f"(i) answer tokens kept by each head's top-k: {a['tokens']} answer tokens in the source "
        f"references of {a['items']} items (references of {a['reference_tokens']['mean']} tokens on average, "
        f"at most {a['reference_tokens']['max']}; answer not found in its source: {a['not_found']}, "
        f"not re-tokenizable: {a['not_retokenized']})",
        "",
        "| layer, KV head | " + " | ".join(f"k={k}" for k in ks) + " |",
        "|---|" + "---|" * len(ks),
    ]
    for layer in range(mc.n_mem_layers):
        for head in range(mc.n_kv_heads):
            lines.append(
                f"| {layer}, {head} | " + " | ".join(f"{a['kept'][k]['heads'][layer][head]:.1%}" for k in ks) + " |"
            )
    lines.append("| chance (k / length) | " + " | ".join(f"{a['kept'][k]['chance']:.1%}" for k in ks) + " |")
    dense = {
        m: next(
            (
                row[m]["vs_none"].get("gain")
                for row in r["gain"]
                if row["top_k"] == mc.ref_max_tokens and row["codec"] == "raw"
            ),
            None,
        )
        for m in ("memory", "oracle")
    }

    def cell(row, m):
        g, x = row[m]["vs_none"], row[m]["exact_vs_none"]
        share = f"{g['gain'] / dense[m]:.0%}" if dense[m] and g.get("gain") is not None and dense[m] > 0 else "n/a"
        return (
            f"{g.get('gain', float('nan')):+.4f} ± {g.get('stderr', float('nan')):.4f} | "
            f"{row[m]['exact_match']:.1%} ({x.get('gain', 0):+.1%}) | {share}"
        )

    lines += [
        "",
        f"(ii) gain over none (the same weights without memory: loss {r['none']['loss']:.4f}, exact "
        f"{r['none']['exact_match']:.1%}); answer-token loss, paired per item; exact match and its change; "
        f"share of the dense gain (k={mc.ref_max_tokens} raw)",
        "",
        "| k | codec | bytes/ref | memory: loss gain | exact (vs none) | of dense | oracle: loss gain | "
        "exact (vs none) | of dense |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {row['top_k']} | {row['codec']} | {row['bytes_per_reference']:,} | {cell(row, 'memory')} | "
        f"{cell(row, 'oracle')} |"
        for row in r["gain"]
    ]
    if r["vq"]:
        lines.append(f"\nvq: one quantizer for every k, {r['vq']}")
    lines.append(f"seconds: {r['seconds']}")
    return "\n".join(lines)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("-c", "--config", required=True)
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--items", type=int, default=200, help="probe items drawn at random (0 = all)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ks", default=",".join(map(str, KS)), help="tokens per head, comma-separated")
    p.add_argument("--codecs", default=",".join(CODECS), help="of raw, int8, vq")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--build", help="a published build instead of the live one (its number, live, -1)")
    p.add_argument(
        "--threads",
        type=int,
        help="torch threads (default torch's: one per core; on cores shared "
        "with other work 1 was 4-7x faster per matmul)",
    )
    p.add_argument("--json", help="also write the results here")
    a = p.parse_args(argv)
    if a.threads:
        import torch

        torch.set_num_threads(a.threads)
    out = run(
        a.config,
        a.overrides,
        a.items,
        a.seed,
        [int(k) for k in a.ks.split(",")],
        a.codecs.split(","),
        a.batch_size,
        a.build,
    )
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=2, default=str))
    return out


if __name__ == "__main__":
    main()
