"""`m3 eval`'s table and plot, from the results jobs/inference/evaluate.py writes to eval.json."""

from __future__ import annotations

from storage.staging import open_atomic

# what a row is, where its name alone would not say
LABELS = {"none": "none (same weights: diagnostic)"}


def _gain(p: dict | None) -> str:
    if not p:
        return ""
    rel = f" ({p['relative']:+.1%})" if p.get("relative") is not None else ""
    return f"{p['gain']:+.4f} ± {p['stderr']:.4f}{rel}, {p['helped']}/{p['of']}"


def mode_lines(modes: dict) -> list[str]:
    """One row per mode: loss, perplexity, exact match where scored, the paired gain over the
    same weights without memory and, when the equal-compute control was scored, over it."""
    exact = any("exact_match" in v for v in modes.values())
    control = any(v.get("vs_control") for v in modes.values())
    head = f"  {'mode':<40}{'loss':>8}{'ppl':>9}" + (f"{'exact':>8}" if exact else "")
    head += f"   {'gain over none (paired)':<34}" + ("   gain over the control (paired)" if control else "")
    lines = [head.rstrip()]
    for m, v in modes.items():
        row = f"  {LABELS.get(m, m):<40}{v['loss']:>8.4f}{v['ppl']:>9.2f}"
        if exact:
            row += f"{v['exact_match']:>8.1%}" if v.get("exact_match") is not None else f"{'':>8}"
        row += f"   {_gain(v.get('vs_none')):<34}"
        if control:
            row += f"   {_gain(v.get('vs_control'))}"
        lines.append(row.rstrip())
    return lines


def headline_line(r: dict) -> str:
    h = r.get("headline") or {}
    if h.get("missing"):
        return (
            f"headline: the equal-compute control is missing ({h['missing']}); the gains below are over "
            f"the same weights without memory, a diagnostic (a state the memory model never trained in), "
            f"not the claim"
        )
    if "gain" not in h:
        return "headline: too few sequences to pair"
    return (
        f"headline: the served memory model vs the equal-compute control (the same warmup and steps "
        f"without memory), paired per sequence: {_gain(h)} sequences helped"
    )


def render(r: dict) -> str:
    scored = next(iter(r["modes"].values()))["tokens"]
    if not r["sequences"]:
        # one-chunk sequences (chunking.seq_len = the memory chunk): serving reads memories from a
        # sequence's second chunk on, so held-out text has no token that reads one; say so rather
        # than print a table of zeros
        lines = [
            f"evaluation: no held-out sequence is longer than one memory chunk (first "
            f"{r['tokens_per_sequence']} tokens): serving reads memories from the second chunk on, so "
            f"held-out text has nothing to score; the QA probe below is what measures memory here"
        ]
        return "\n".join(lines + _probe_lines(r))
    lines = [
        f"evaluation: {r['sequences']} held-out sequences (never trained on), first "
        f"{r['tokens_per_sequence']} tokens, {scored:,} scored; model {r['model_hash'][:12]} "
        f"({'sink kept' if r.get('sink') else 'plain'} without memory); no scored token reads a reference "
        f"of its sequence's own documents or one overlapping the whole sequence by more than "
        f"{r['max_overlap']} (eq. 6)",
        headline_line(r),
    ]
    for w in (r.get("control") or {}).get("warnings", []):
        lines.append(f"  WARNING: {w}")
    schedule = (r.get("trained_to_read") or {}).get("schedule")
    if schedule not in (None, "serving"):
        lines.append(
            f"  WARNING: the model was trained on the {schedule!r} memory schedule and is served on "
            f"the 'serving' one (chunk c reads what chunk c-1 retrieved)"
        )
    if isinstance(r.get("build"), dict) and not r["build"].get("live"):
        b = r["build"]
        lines.insert(
            0,
            f"published build {b['build']}, not the live one (tables: "
            f"{', '.join(f'{t} v{v}' for t, v in sorted(b['versions'].items()))})",
        )
    lines += mode_lines(r["modes"])
    served = (r["modes"].get("memory") or {}).get("vs_none") or {}
    dense = (r["modes"].get("memory, dense raw (same references)") or {}).get("vs_none") or {}
    if served and dense and dense.get("gain", 0) > 0:
        lines.append(
            f"  the served bank ({(r.get('served') or {}).get('top_k')} tokens per head, "
            f"{(r.get('served') or {}).get('codec')}) keeps {served['gain'] / dense['gain']:.0%} of the "
            f"gain of dense raw memories of the same references"
        )
    lines += _probe_lines(r)
    return "\n".join(lines)


def _probe_lines(r: dict) -> list[str]:
    """The knowledge probe's and the QA probes' lines, and the memory cache's."""
    lines = []
    p = r["probe"]
    if p.get("references"):
        lines.append(
            f"knowledge probe: {p['references']} terms whose entry no training sequence contains "
            f"(of {p['documents']:,}); prompt = the headword, the definition scored "
            f"({next(iter(p['modes'].values()))['tokens']:,} tokens); 'memory' never reads the "
            f"entry's document nor a reference overlapping it by more than {r['max_overlap']}; "
            f"'bank holds the entry' may read the entry itself (the look-up: a diagnostic)"
        )
        lines += mode_lines(p["modes"])
    else:
        lines.append(f"knowledge probe: {p.get('note')}")
    for q in r.get("qa") or []:
        lines.append(
            f"QA probe {q['file']}: {q['items']} items, {q['answer_tokens']:,} answer tokens scored; "
            f"the source is in the bank for {q['with_sources']}; exact = the greedy continuation "
            f"starts with the answer"
        )
        lines += mode_lines(q["modes"])
    if "memory_cache" in r:
        c = r["memory_cache"]
        lines.append(f"  memory cache: {c['hits']} hits, {c['misses']} misses; {r['seconds']} s")
    return lines


def plot_eval(r: dict, path) -> str | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    groups = ([("held-out", r["modes"])] if r["sequences"] else []) + (
        [("probe", r["probe"]["modes"])] if r["probe"].get("modes") else []
    )
    groups += [(f"QA {q['file'].rsplit('/', 1)[-1]}", q["modes"]) for q in r.get("qa") or []]
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
