"""Does explicit memory help, and under which recipe? The paper's Fig. 11 and the served-bank
trade-off, measured on one bank with the honest evaluation of `m3 eval` (jobs/inference/evaluate.py).

    .venv/bin/python bench/memory_gain.py -c configs/science.yaml            # ~60 min on 2 cores
    .venv/bin/python bench/memory_gain.py -c configs/science.yaml --set train.workers=1 ...

One bank (ingest, embed, pair: the real stages, resumable), then four training runs through the
real trainer (`m3 train`: DeepSpeed on Ray Train), same data, same step counts, same seed:

- control warmup:  warmup_stage_steps without memory (the paper's recipe, first stage);
- control-control: then continual_stage_steps without memory;
- control-memory:  then continual_stage_steps with memory (the paper's recipe);
- memory-memory:   warmup_stage_steps + continual_stage_steps with memory from scratch.

Each final model is scored on the held-out split (never trained on) in its own no-memory
distribution (sink kept for the models that read memories) and with the memories the serving
schedule retrieves, encoded on the fly at the sparsity and through the codec it was trained with
(what the bank serves once encoded); paired per sequence, with the other-sequence control. The
knowledge probe scores references of documents no training sequence contains.

The trade-off table takes the control-memory model and serves it memories at 8, 16, 32, 64 and
128 (dense) tokens per head, raw float32, int8 and vq (a quantizer trained on its memories, as
`m3 encode` does): gain over none, bytes per reference. It writes <bank>/science/results.json,
memory_gain.png (training curves of the three recipes, held-out gains) and prints the tables.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

RECIPES = {  # name: (warmup run, stage, train overrides)
    "control warmup": ("control", "warmup", {}),
    "control-control": ("control-control", "continual", {"continual_with_memory": False}),
    "control-memory": ("control-memory", "continual", {}),
    "memory-memory warmup": ("memory-memory", "warmup", {"warmup_with_memory": True}),
    "memory-memory": ("memory-memory", "continual", {}),
}
FROM = {"control-control": "control", "control-memory": "control", "memory-memory": "memory-memory"}


def run_dir(cfg, name: str) -> Path:
    return Path(cfg.bank.uri) / "science" / name


def recipe_config(cfg, recipe: str):
    name, stage, over = RECIPES[recipe]
    tc = dataclasses.replace(cfg.train, run_dir=str(run_dir(cfg, name)), evidence=False, **over)
    if stage == "continual":
        tc = dataclasses.replace(tc, warmup_checkpoint=str(run_dir(cfg, FROM[recipe]) / "warmup" / "model"))
    return dataclasses.replace(cfg, train=tc), stage


def train_all(cfg) -> dict:
    from jobs.training.trainer import run_train

    seconds = {}
    for recipe in RECIPES:
        rc, stage = recipe_config(cfg, recipe)
        t0 = time.perf_counter()
        print(f"== {recipe}: {stage} stage in {rc.train.run_dir}", flush=True)
        run_train(rc, stage)
        seconds[recipe] = round(time.perf_counter() - t0, 1)
    return seconds


def evaluate_all(cfg) -> dict:
    from jobs.training.evidence import evaluate_checkpoint
    from storage.bank import Bank

    out = {}
    for recipe in ("control warmup", "control-control", "control-memory", "memory-memory"):
        rc, stage = recipe_config(cfg, recipe)
        bank = Bank.of(rc)
        out[recipe] = evaluate_checkpoint(rc, bank, bank.trained_model(stage), rc.train, probe=True)
        print(f"{recipe}: " + json.dumps({m: v["loss"] for m, v in out[recipe]["modes"].items()}), flush=True)
    return out


def tradeoff(
    cfg, recipe: str = "control-memory", top_ks=(8, 16, 32, 64, 128), codecs=("raw-fp32", "int8", "vq")
) -> list[dict]:
    """Gain over none of one trained model served at several sparsities and codecs."""
    import numpy as np

    from jobs.inference.engine import bank_retriever, bank_tokenizer
    from jobs.inference.evaluate import evaluate_items, heldout_items, reads_memory, strict
    from jobs.inference.retriever import CodedStore, EncodingStore
    from model import load_model
    from model.codecs import VQCodec, make_codec
    from storage.bank import Bank

    rc, stage = recipe_config(cfg, recipe)
    ckpt = Path(rc.train.run_dir) / stage / "model"
    bank, model = Bank(cfg.bank.uri), load_model(ckpt).eval()
    mc = model.config
    items = heldout_items(
        bank,
        rc.train.heldout_fraction,
        rc.train.eval_sequences,
        rc.train.max_tokens or mc.max_seq_len,
        mc.mem_chunk_size,
    )
    retriever = bank_retriever(cfg, bank, bank_tokenizer(bank), mc.mems_per_chunk)
    held = strict(cfg.infer.max_overlap)
    rng = np.random.default_rng(cfg.encode.seed)
    all_ids = bank.dataset("refs").to_table(columns=["ref_id"]).column("ref_id").to_pylist()
    sample = [
        all_ids[i] for i in sorted(rng.choice(len(all_ids), min(len(all_ids), cfg.encode.vq_train_refs), replace=False))
    ]
    rows = []
    for k in top_ks:
        raw = EncodingStore(model, retriever.ref_tokens, top_k=k)
        modes = {"none": ("none", None, held)}
        for name in codecs:
            if name == "vq":  # trained on a uniform sample of this model's memories, as `m3 encode` does
                mems, _ = raw.fetch(sample)
                codec = VQCodec.train(mems, seed=cfg.encode.seed)
            else:
                codec = make_codec(name)
            modes[name] = ("memory", CodedStore(raw, codec), held)
        res = evaluate_items(
            model,
            items,
            sink=reads_memory(ckpt),
            modes=modes,
            retriever=retriever,
            batch_size=cfg.infer.eval.batch_size,
        )
        shape = (mc.n_mem_layers, 2, mc.n_kv_heads, min(k, mc.ref_max_tokens), mc.head_dim)
        for name in codecs:
            codec = modes[name][1].codec
            rows.append(
                {
                    "top_k": k,
                    "codec": name,
                    "bytes_per_reference": codec.nbytes(shape),
                    "loss": res[name]["loss"],
                    **res[name]["vs_none"],
                }
            )
            print(f"trade-off: top-{k} {name}: {rows[-1]}", flush=True)
    return rows


def plot(cfg, results: dict, path: Path) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    from jobs.training.log import read_rows

    fig, (ax, bx) = plt.subplots(1, 2, figsize=(13, 4.4))
    w = cfg.train.warmup_stage_steps

    def curve(recipe):
        rc, _ = recipe_config(cfg, recipe)
        first = Path(rc.train.run_dir) / "warmup" if recipe == "memory-memory" else run_dir(cfg, "control") / "warmup"
        return [
            r["loss"]
            for r in read_rows(first / "log.jsonl") + read_rows(Path(rc.train.run_dir) / "continual" / "log.jsonl")
        ]

    base = curve("control-control")
    k = 25
    for recipe, color in (("control-memory", "tab:red"), ("memory-memory", "tab:blue")):
        diff = [a - b for a, b in zip(curve(recipe), base)]
        smooth = [sum(diff[max(0, i - k + 1) : i + 1]) / len(diff[max(0, i - k + 1) : i + 1]) for i in range(len(diff))]
        ax.plot(range(1, len(smooth) + 1), smooth, label=f"{recipe} minus control-control", color=color, linewidth=1.2)
    ax.axhline(0, color="tab:gray", linewidth=0.8)
    ax.axvline(w, color="black", linewidth=0.6, linestyle=":")
    ax.set_xlabel(f"step (warmup {w}, then continual; same sequences in the same order)")
    ax.set_ylabel(f"training loss difference ({k}-step mean)")
    ax.legend(fontsize=8)
    ax.set_title("the paper's Fig. 11 recipes against control-control")
    names, vals, errs = [], [], []
    for recipe, r in results["evaluation"].items():
        m = r["modes"]
        names.append(f"{recipe}, none")
        vals.append(m["none"]["loss"])
        errs.append(0)
        if "memory" in m:
            names.append(f"{recipe}, memory")
            vals.append(m["memory"]["loss"])
            errs.append(3 * m["memory"]["vs_none"]["stderr"])
    bx.bar(
        range(len(names)), vals, yerr=errs, capsize=3, color=["tab:gray" if "none" in n else "tab:red" for n in names]
    )
    bx.set_xticks(range(len(names)), names, fontsize=7, rotation=30, ha="right")
    bx.set_ylim(min(vals) - 0.1, max(vals) + 0.05)
    bx.set_ylabel("held-out loss per token (±3 paired SE)")
    bx.set_title("held-out, served memories (serving schedule)")
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return path


def findings(results: dict) -> list[dict]:
    """The paper's two findings as paired differences between models on the same held-out
    sequences: each model with memory where it reads memory, the control-control model plain."""
    from jobs.inference.evaluate import paired_items

    ev = results["evaluation"]

    def served(recipe):  # the model as it would be served: with memory if it reads memory
        m = ev[recipe]["modes"]
        return m.get("memory", m["none"])["per_item"]

    base = ev["control-control"]["modes"]["none"]["per_item"]
    rows = [
        ("(b) control-memory vs control-control", served("control-memory"), base),
        ("(a) memory-memory vs control-control", served("memory-memory"), base),
        ("(a) memory-memory vs control-memory", served("memory-memory"), served("control-memory")),
    ]
    return [{"comparison": name, **paired_items(b, a)} for name, a, b in rows]


def markdown(results: dict) -> str:
    lines = [
        "| model | none | memory | gain over none (paired) | control: another sequence's memories "
        "| probe none | probe memory (2/3 filter) | probe gain |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for recipe, r in results["evaluation"].items():
        m, p = r["modes"], (r.get("probe") or {}).get("modes", {})
        mem, oth = m.get("memory"), m.get("memory, another sequence's (control)")
        pm = p.get("memory, 2/3 filter")

        def gain(x):
            v = x["vs_none"]
            return f"{v['gain']:+.4f} ± {v['stderr']:.4f} ({v['relative']:+.1%})"

        lines.append(
            f"| {recipe} | {m['none']['loss']:.4f} | {mem['loss'] if mem else '-'} | {gain(mem) if mem else '-'} | "
            f"{gain(oth) if oth else '-'} | {p.get('none', {}).get('loss', '-')} | {pm['loss'] if pm else '-'} | "
            f"{gain(pm) if pm else '-'} |"
        )
    if results.get("findings"):
        lines += ["", "| finding (paired per held-out sequence) | loss lower by | sequences helped |", "|---|---|---|"]
        for f in results["findings"]:
            lines.append(
                f"| {f['comparison']} | {f['gain']:+.4f} ± {f['stderr']:.4f} ({f['relative']:+.1%}) | "
                f"{f['helped']}/{f['of']} |"
            )
    if results.get("tradeoff"):
        lines += [
            "",
            "| tokens per head | codec | bytes per reference | held-out loss | gain over none (paired) |",
            "|---|---|---|---|---|",
        ]
        for row in results["tradeoff"]:
            lines.append(
                f"| {row['top_k']} | {row['codec']} | {row['bytes_per_reference']:,} | {row['loss']:.4f} | "
                f"{row['gain']:+.4f} ± {row['stderr']:.4f} ({row['relative']:+.1%}) |"
            )
    return "\n".join(lines)


def main(argv=None) -> int:
    from jobs.config import load_config
    from jobs.stages.embed import run_embed
    from jobs.stages.ingest import run_ingest
    from jobs.stages.pair import run_pair

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("-c", "--config", default="configs/science.yaml")
    p.add_argument("--set", dest="overrides", action="append", default=[])
    p.add_argument("--no-tradeoff", action="store_true")
    p.add_argument("--eval-only", action="store_true", help="score the models a previous run trained")
    p.add_argument("--plot-only", action="store_true", help="redraw the plot and tables of a previous run")
    a = p.parse_args(argv)
    cfg = load_config(a.config, a.overrides)
    out = Path(cfg.bank.uri) / "science"
    if a.plot_only:
        results = json.loads((out / "results.json").read_text())
        print(markdown(results))
        print(f"plot {plot(cfg, results, out / 'memory_gain.png')}")
        return 0
    t0 = time.perf_counter()
    seconds = {}
    if not a.eval_only:
        for name, fn in (("ingest", run_ingest), ("embed", run_embed), ("pair", run_pair)):
            t = time.perf_counter()
            fn(cfg)
            seconds[name] = round(time.perf_counter() - t, 1)
        seconds.update(train_all(cfg))
    t = time.perf_counter()
    results = {"config": a.config, "overrides": a.overrides, "evaluation": evaluate_all(cfg)}
    results["findings"] = findings(results)
    seconds["evaluate"] = round(time.perf_counter() - t, 1)
    if not a.no_tradeoff:
        t = time.perf_counter()
        results["tradeoff"] = tradeoff(cfg)
        seconds["tradeoff"] = round(time.perf_counter() - t, 1)
    results["seconds"] = {**seconds, "total": round(time.perf_counter() - t0, 1)}
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2))
    png = plot(cfg, results, out / "memory_gain.png")
    print(markdown(results))
    print(f"seconds: {results['seconds']}; results {out / 'results.json'}" + (f", plot {png}" if png else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
