"""The report `m3 run` ends with: <bank>/_reports/run.md (for people) and run.json (for tools).

Built from what the stages returned and committed (training logs, evidence files), so a rerun
that finds every stage done still writes the same numbers.
"""

from __future__ import annotations

import json
import time

from upath import UPath

from storage.bank import Bank
from storage.layout import LayoutError
from storage.staging import write_text_atomic


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4f}" if abs(v) < 100 else f"{v:,.1f}"
    return f"{v:,}" if isinstance(v, int) else str(v)


def _stage_line(name: str, r: dict) -> str:
    """One short phrase of what a stage produced."""
    if r.get("status") == "up_to_date":
        return "up to date (nothing to do)"
    if r.get("status") == "skipped":
        return f"skipped ({r.get('reason')})"
    if name == "ingest":
        return (
            f"{r.get('documents', 0):,} documents kept, {r.get('rejected', 0):,} rejected; "
            f"{r.get('references', 0):,} references, {r.get('train_sequences', 0):,} sequences"
        )
    if name in ("warmup", "continual", "control"):
        return f"{r.get('steps')} steps, final training loss {_fmt(r.get('final_loss'))}, model {str(r.get('model_hash'))[:12]}"
    if name == "pair":
        return (
            f"{r.get('chunks', 0):,} chunks, {r.get('with_neighbor', 0):,} with a neighbor, "
            f"{r.get('dropped', 0):,} candidates dropped by the overlap filter"
        )
    if name == "encode":
        return f"{r.get('references', 0):,} memories by model {str(r.get('model_hash'))[:12]} ({r.get('refs_per_s')} refs/s)"
    if name == "embed":
        return f"{r.get('references', r.get('vectors', 0)):,} vectors"
    if name == "publish":
        return "live build: " + ", ".join(f"{t} v{v}" for t, v in r.get("versions", {}).items())
    if name == "evaluate" and (r.get("modes") or r.get("qa")):
        parts = []
        if r.get("sequences"):  # no held-out sequence (one-chunk sequences): its losses are not zeros
            parts.append("held-out loss " + ", ".join(f"{m} {v['loss']:.4f}" for m, v in r["modes"].items()))
        for probe in r.get("qa") or []:
            parts.append(
                f"QA probe {str(probe.get('file')).rsplit('/', 1)[-1]} exact match "
                + ", ".join(f"{m} {v['exact_match']:.1%}" for m, v in probe["modes"].items() if "exact_match" in v)
            )
        return "; ".join(parts) or "no held-out sequence and no QA probe"
    return ", ".join(f"{k} {_fmt(v)}" for k, v in r.items() if isinstance(v, (int, float)))[:200]


def evidence_lines(ev: dict) -> list[str]:
    rows = [
        ("warmup model (no memory)", ev.get("warmup_loss")),
        ("continual model, without memory (sink kept, zero memories)", ev.get("continual_loss_no_memory")),
        ("continual model, with memory", ev.get("continual_loss_memory")),
        ("continual model, with another sequence's memories (control)", ev.get("continual_loss_other_memory")),
    ]
    out = [
        f"Held-out loss per token at the end of training ({ev.get('sequences')} sequences, "
        f"{ev.get('tokens'):,} scored tokens, same split for every row; memories retrieved on the serving "
        "schedule, encoded on the fly as the bank will store them):",
        "",
        "| model | loss | perplexity |",
        "|---|---|---|",
    ]
    import math

    out += [f"| {name} | {v:.4f} | {math.exp(v):,.1f} |" for name, v in rows if v is not None]
    if ev.get("continual_loss_memory") is not None:
        gain = ev["continual_loss_no_memory"] - ev["continual_loss_memory"]
        verdict = (
            f"Memory lowers the continual model's held-out loss by {gain:.4f} nats/token "
            f"({gain / ev['continual_loss_no_memory']:.1%})."
            if gain > 0
            else f"Memory does not lower the held-out loss here ({-gain:.4f} nats/token higher with it)."
        )
        out += ["", verdict]
        p = ev.get("paired") or {}
        if p:
            out += [
                "",
                f"Per sequence (paired, same weights): {p['gain']:+.4f} ± {p['stderr']:.4f} "
                f"(standard error) nats/token; memory helped {p['helped']} of {p['of']} sequences.",
            ]
        c = ev.get("paired_other") or {}
        if c and p:
            out += [
                f"The control (each sequence given the memories of another one): {c['gain']:+.4f} ± "
                f"{c['stderr']:.4f}, helped {c['helped']} of {c['of']}; what memory adds beyond "
                f"attending to any extra tokens is the difference, {p['gain'] - c['gain']:+.4f}."
            ]
    return out


def write_run_report(cfg, bank: Bank, results: dict, seconds: dict, total: float) -> UPath:
    out_dir = bank.layout.reports()
    lines = [
        f"# m3 run: {cfg.name}",
        "",
        f"Config `{cfg.source}`, bank `{bank.uri}`, {time.strftime('%Y-%m-%d %H:%M:%S')}; {total:.0f} s in all.",
        "",
        "| stage | seconds | result |",
        "|---|---|---|",
    ]
    lines += [f"| {name} | {seconds[name]:.1f} | {_stage_line(name, r)} |" for name, r in results.items()]
    lines += start_lines(cfg, bank, results)
    training = _training_root(bank)
    ev = (results.get("continual") or {}).get("evidence") or (
        _read(training / "continual" / "evidence.json") if training else None
    )
    if ev:
        lines += ["", "## Held-out evidence at the end of training", ""] + evidence_lines(ev)
    png = training / "loss.png" if training else None
    if png is not None and png.exists():
        lines += [
            "",
            "## Training loss",
            "",
            "Warmup, then continual (with memory) and, dashed beside it, the "
            "equal-compute control (the same steps from the same warmup model, without memory), when trained.",
            "",
            f"![loss curves of the training stages]({png})",
        ]
    for name, r in results.items():  # stages that bring their own markdown (evaluation)
        if isinstance(r, dict) and r.get("markdown"):
            lines += ["", r["markdown"]]
    md = out_dir / "run.md"
    write_text_atomic(md, "\n".join(lines) + "\n")
    write_text_atomic(
        out_dir / "run.json",
        json.dumps({"stages": results, "seconds": seconds, "total_seconds": total}, indent=2, default=str),
    )
    print("\n".join(lines), flush=True)
    return md


def start_lines(cfg, bank: Bank, results: dict) -> list[str]:
    """Which checkpoint the memory stages started from: the warmup stage's, or the one
    train.warmup_checkpoint names (a pretrained model `m3 import-model` wrote names its source)."""
    from jobs.models import warmup_model_dir

    if not cfg.train.warmup_checkpoint and not {"continual", "control"} & set(results):
        return []
    try:
        path = warmup_model_dir(bank, cfg.train)
    except LayoutError:
        return []
    export = _read(path / "export.json") or {}
    line = f"Continual and control start from `{path}` (model {str(export.get('model_hash'))[:12]}"
    imported = _read(path / "import.json")
    if imported:
        line += f", imported from `{imported['source']}`, a {imported['architecture']}, by `m3 import-model`"
    return ["", line + ")."]


def _training_root(bank: Bank):
    """Where the training stages write, or None for a bank on an object store without
    train.run_dir: no training ran there."""
    try:
        return bank.training("continual").parent
    except LayoutError:
        return None


def _read(path: UPath) -> dict | None:
    return json.loads(path.read_text()) if path.exists() else None
