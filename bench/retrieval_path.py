"""CPU seconds of decode's retrieval path, step by step, against the decode it serves: the calls
of one bench/decode.py run (batch 32, 128 + 128 tokens: 64 prompt-chunk queries, then 32 swap
queries) recorded from a real decode and replayed, the current path and the issue-13 baseline
built from the same pieces (LanceDB search through its index, one eq. 6 call per row, the
references' tokens scanned from `refs` every call), interleaved, medians; and the CPU of the
no-retrieval decode in the same process for scale. Process CPU time, so the figures hold under
load far better than wall time (a loaded machine still inflates them somewhat).

    .venv/bin/python bench/retrieval_path.py -c configs/demo.yaml --set bank.uri=<bank> [--repeats 7]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from model.generation import generate_with_memory  # noqa: E402
from pipelines.overlap import overlap_exceeds_rows, overlap_many  # noqa: E402
from storage.bank import tokens_of  # noqa: E402
from storage.vectors import search  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from decode import bank_rows  # noqa: E402


def steps_current(r, queries, contexts, ids_out):
    texts = [r.tokenizer.decode(q) for q in queries]
    yield "embed"
    vectors = r.embedder.embed(texts)
    yield "search"
    hits = (
        r.matrix().search(vectors, k=r.candidates)
        if r.matrix() is not None
        else search(r.table, vectors, k=r.candidates, exact=r.exact, params=r.params)
    )
    ids = [[h for h, _ in row] for row in hits]
    yield "filter"
    tokens = r._token_arrays({x for row in ids for x in row})
    drop = overlap_exceeds_rows(
        [np.asarray(c, np.int64) for c in contexts], [[tokens[x] for x in row] for row in ids], r.max_overlap
    )
    ids_out.append([[x for x, d in zip(row, dr) if not d][: r.per_query] for row, dr in zip(ids, drop)])
    yield "fetch"
    r.memories(ids_out[-1])


def steps_baseline(r, queries, contexts, ids_out):
    texts = [r.tokenizer.decode(q) for q in queries]
    yield "embed"
    vectors = r.embedder.embed(texts)
    yield "search"
    hits = search(r.table, vectors, k=r.candidates, exact=r.exact, params=r.params)
    ids = [[h for h, _ in row] for row in hits]
    yield "filter"
    tokens = tokens_of(r.refs, sorted({x for row in ids for x in row}))
    out = []
    for row, text in zip(ids, contexts):
        over = overlap_many(text, [tokens[x] for x in row]) if row else []
        out.append([x for x, o in zip(row, over) if o <= r.max_overlap][: r.per_query])
    ids_out.append(out)
    yield "fetch"
    r.memories(out)


def timed(gen) -> dict[str, float]:
    spent, name, t = defaultdict(float), None, time.process_time()
    for nxt in gen:
        now = time.process_time()
        if name:
            spent[name] += now - t
        name, t = nxt, time.process_time()
    spent[name] += time.process_time() - t
    return spent


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("-c", "--config", default="configs/demo.yaml")
    p.add_argument("--set", dest="overrides", action="append", default=[])
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    dargs = argparse.Namespace(
        config=args.config, overrides=args.overrides, device="cpu", dtype="float32", batch=32, input=128, output=128
    )
    plans, info = bank_rows(dargs)
    r, inf = info["retriever"], info["inf"]
    calls = []

    def recording(queries, contexts):
        calls.append(([q.tolist() for q in queries], [c.tolist() for c in contexts]))
        return r(queries, contexts)

    generate_with_memory(inf.model, info["batch"], 128, recording)
    none = plans["none"][0]
    paths = {"current": steps_current, "baseline (before issue 13's retrieval work)": steps_baseline}
    runs = {name: [] for name in paths}
    none_cpu, answers = [], {name: [] for name in paths}
    for rep in range(args.repeats):
        c0 = time.process_time()
        none()
        none_cpu.append(time.process_time() - c0)
        # the order alternates: the path run right after a decode pays for its freed memory
        for name, steps in sorted(paths.items(), reverse=bool(rep % 2)):
            total = defaultdict(float)
            answers[name] = []
            for q, c in calls:
                for k, v in timed(steps(r, q, c, answers[name])).items():
                    total[k] += v
            runs[name].append(total)
    med = statistics.median
    base = med(none_cpu)
    print(
        f"retrieval path, CPU s per decode run ({len(calls)} calls, {sum(len(q) for q, _ in calls)} queries), "
        f"{args.repeats} repeats (median); decode without retrieval: {base:.2f} CPU s"
    )
    print("| path | embed | search | filter | fetch | total | share of the no-retrieval decode |")
    print("|---|---|---|---|---|---|---|")
    for name in paths:
        parts = {k: med([run[k] for run in runs[name]]) for k in ("embed", "search", "filter", "fetch")}
        total = med([sum(run.values()) for run in runs[name]])
        print(
            f"| {name} | " + " | ".join(f"{v:.3f}" for v in parts.values()) + f" | {total:.3f} | {total / base:.1%} |"
        )
    same = answers["current"] == answers["baseline (before issue 13's retrieval work)"]
    print(f"same memories chosen by both paths: {same} (differences: exact search vs the ANN index)")
    print(f"load average at the end: {' '.join(f'{x:.1f}' for x in os.getloadavg())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
