"""The printed table and the plot of bench/scale.py, from its results (one dict per size).

    .venv/bin/python bench/scale.py --replot bench/results/scale-<date>.json

Every figure is printed with its ratio to the first size's; the plot is wall seconds per 1k
references against the bank's size (log x), the index build drawn apart from its embed stage.
"""

from __future__ import annotations

from pathlib import Path

ROWS = [  # (label, getter, unit, per-reference): the printed table and the ratios
    *[
        (f"{s} {k}", (lambda r, s=s, k=k: r["stages"][s][f"{k}_s"] / r["references"] * 1e3), "s/1k refs", True)
        for s in ("ingest", "embed", "encode", "pair")
        for k in ("wall", "cpu")
    ],
    ("index build", lambda r: r["index"]["seconds"] / r["references"] * 1e3, "s/1k refs", True),
    *[
        (f"peak RSS {k}, {s}", (lambda r, s=s, k=k: r["stages"][s][f"rss_{k}"] / 2**20), "MiB", False)
        for s in ("ingest", "embed", "encode", "pair", "rebuild_1pct", "compact")
        for k in ("driver", "workers_sum", "worker_max")
    ],
    *[  # what the stage itself added to the driver (a table read whole shows here, growing with N)
        (
            f"driver RSS added, {s}",
            (lambda r, s=s: (r["stages"][s]["rss_driver"] - r["stages"][s]["rss_driver_start"]) / 2**20),
            "MiB",
            False,
        )
        for s in ("ingest", "embed", "encode", "pair", "rebuild_1pct", "compact")
    ],
    ("disk total", lambda r: sum(r["disk_bytes"].values()) / r["references"], "B/ref", True),
    *[
        (f"disk {t}", (lambda r, t=t: r["disk_bytes"].get(t, 0) / r["references"]), "B/ref", True)
        for t in ("refs", "memories", "embeddings", "documents", "train_sequences", "rejects", "neighbors")
    ],
    (
        "disk other (_slabs, _memo, ...)",
        lambda r: r["disk_bytes"]["other (_slabs, _memo, quantizers, ...)"] / r["references"],
        "B/ref",
        True,
    ),
    ("search p50", lambda r: r["search"]["search_p50_ms"], "ms", False),
    ("search p99", lambda r: r["search"]["search_p99_ms"], "ms", False),
    ("embed query p50", lambda r: r["search"]["embed_query_p50_ms"], "ms", False),
    *[
        (f"fetch {b} {m}", (lambda r, b=b, m=m: r["fetch"][f"fetch{b}_{m}_ms"]), "ms", False)
        for b in (5, 160)
        for m in ("cold", "warm")
    ],
    ("decode none", lambda r: r["decode"]["decode_none_tok_s"], "tok/s", False),
    ("decode memory cold / none", lambda r: r["decode"]["decode_memory_cold_cache_vs_none"], "ratio", False),
    ("decode memory warm / none", lambda r: r["decode"]["decode_memory_warm_cache_vs_none"], "ratio", False),
    *[
        (f"decode memory warm: {k} s per run", (lambda r, k=k: r["decode"]["retrieval_s_per_warm_run"][k]), "s", False)
        for k in ("embed", "search", "filter", "fetch")
    ],
    ("decode memory warm: wall s per run", lambda r: r["decode"]["decode_memory_warm_s"], "s", False),
    (
        "compact: bytes after / before",
        lambda r: r["compact"]["bytes_after"] / r["compact"]["bytes_before"],
        "ratio",
        False,
    ),
    *[
        (f"sql {k}", (lambda r, k=k: r["sql"][k]), "s", False)
        for k in (
            "count_in_process_s",
            "count_command_s",
            "join_in_process_s",
            "join_command_s",
            "stats_in_process_s",
            "stats_command_s",
        )
    ],
    ("rebuild unchanged", lambda r: r["stages"]["rebuild_unchanged"]["wall_s"], "s", False),
    ("rebuild full (ingest+embed+encode)", lambda r: r["rebuild"]["full_s"], "s", False),
    ("rebuild 1 % edit", lambda r: r["rebuild"]["incremental_s"], "s", False),
    ("rebuild 1 % / full", lambda r: r["rebuild"]["ratio"], "ratio", False),
    ("compact", lambda r: r["stages"]["compact"]["wall_s"] / r["references"] * 1e3, "s/1k refs", True),
]


def table(results: list[dict]) -> str:
    base = results[0]
    head = " | ".join(
        f"{r['references']:,} refs" + ("" if r is base else f" (× {base['references']:,})") for r in results
    )
    lines = [f"| measure | unit | {head} |", "|---|---|" + "---:|" * len(results)]
    for label, get, unit, _ in ROWS:
        cells = []
        for r in results:
            try:
                v, b = get(r), get(base)
            except (KeyError, TypeError, ZeroDivisionError):
                cells.append("-")
                continue
            fmt = f"{v:,.3f}" if abs(v) < 100 else f"{v:,.0f}"
            cells.append(fmt if r is base or not b else f"{fmt} ({v / b:.2f}×)")
        lines.append(f"| {label} | {unit} | {' | '.join(cells)} |")
    return "\n".join(lines)


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))

    def line(get, style, label):  # sizes without the measurement (a size run with no rebuild) are left out
        pts = [(r["references"], get(r) / r["references"] * 1e3) for r in results if _has(get, r)]
        if pts:
            ax.plot(*zip(*pts), style, label=label)

    for s in ("ingest", "embed", "encode", "pair", "compact"):
        line(lambda r, s=s: r["stages"][s]["wall_s"], "o-", s)
    line(lambda r: r["index"]["seconds"], "o:", "index build (in embed)")
    line(lambda r: r["rebuild"]["incremental_s"], "o--", "rebuild 1 %")
    ax.set_xscale("log")
    ax.set_xlabel("references in the bank")
    ax.set_ylabel("wall seconds per 1k references")
    ax.set_title("bench/scale.py: cost per reference against bank size")
    ax.legend()
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def _has(get, r: dict) -> bool:
    try:
        get(r)
    except (KeyError, TypeError):
        return False
    return True
