"""Eq. 6 overlap speed: pairs/s of pipelines/overlap.py for |t| = 2048, |r| = 128 on real tokens,
against two baselines implemented here and measured in the same process.

    .venv/bin/python bench/overlap.py                  # ~1-2 min on one shared core
    .venv/bin/python bench/overlap.py --clock wall --sequences 2

Data: FOLDOC entries, tokenized with a byte-level BPE of the demo's vocabulary size (8192)
trained on the first --train-records entries, concatenated into one token stream. Each text t is
a 2048-token slice of the stream; against each t go --refs 128-token references (the pairing
job's 32 chunks x candidates): "candidates" are slices from elsewhere in the stream (the usual
case: unrelated or related text), "contained" are slices of t with 5 % of the tokens replaced
(the leakage case the filter exists for).

Methods (all exact; the script checks that they agree on every pair they share):
  naive      for each start s of t whose token occurs in r, the LCS DP of r against the window
             t[s : s + 2|r| + 1]: O(|t| |r|^2) cell updates. Vectorized over all starts at once
             (one numpy step per window token, a running max along r), so it is a fair numpy
             baseline, not a Python loop.
  bitpar     the same windows with Hyyro's bit-parallel LCS (|r| bits in 64-bit words, carries
             across words), vectorized over all starts of all references: O(|t| |r| 2|r| / 64).
  seaweed    pipelines.overlap (semi-local LCS by seaweed combing, O(|t| |r|)): `overlap_many`
             for one t against all its references, and `overlap` called once per pair.

Timing: each method's runs are interleaved with the others' and the median is reported. The
machine is shared, so by default the clock is this process's CPU time (--clock process); numpy
runs single-threaded here, so that is the work done. Output: markdown on stdout.
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from pipelines.overlap import overlap, overlap_counts  # noqa: E402
from pipelines.tokenizer import train_bpe  # noqa: E402
from tests.conftest import foldoc_records  # noqa: E402

T_LEN, R_LEN = 2048, 128


def naive_count(t: np.ndarray, r: np.ndarray) -> int:
    """Best LCS of r against every window t[s : s + 2|r| + 1], one DP per window start."""
    m = len(r)
    starts = np.flatnonzero(np.isin(t, r))
    if len(starts) == 0:
        return 0
    row = np.zeros((len(starts), m + 1), np.int32)  # LCS(r[:j], window prefix) per start
    for k in range(2 * m + 1):
        idx = starts + k
        inside = idx < len(t)
        tok = np.where(inside, t[np.minimum(idx, len(t) - 1)], -1)
        match = (tok[:, None] == r[None, :]) & inside[:, None]
        # L'[j] = max(L[j], L'[j-1], L[j-1] + match): a running max of the first two candidates.
        cand = np.maximum(row[:, 1:], row[:, :-1] + match)
        row[:, 1:] = np.maximum.accumulate(cand, axis=1)
    return int(row[:, -1].max())


def bitpar_counts(t: np.ndarray, refs: list[np.ndarray]) -> np.ndarray:
    """Hyyro's bit-vector LCS over every window start of every reference at once."""
    vocab, t_ids = np.unique(t, return_inverse=True)
    words = -(-max(len(r) for r in refs) // 64)
    n_ref, v = len(refs), len(vocab) + 1  # last id: past the end of t, matches nothing
    pm = np.zeros((n_ref, v, words), np.uint64)  # match bit masks of each token, per reference
    for k, r in enumerate(refs):
        at = np.minimum(np.searchsorted(vocab, r), len(vocab) - 1)
        j = np.flatnonzero(vocab[at] == r)
        bits = np.left_shift(np.uint64(1), (j % 64).astype(np.uint64))
        np.bitwise_or.at(pm, (k, at[j], j // 64), bits)
    ids = np.concatenate([t_ids, np.full(2 * words * 64 + 1, v - 1)])
    owner, starts = [], []
    for k, r in enumerate(refs):
        s = np.flatnonzero(np.isin(t, r))
        owner.append(np.full(len(s), k))
        starts.append(s)
    owner, starts = np.concatenate(owner), np.concatenate(starts)
    width = np.array([2 * len(r) + 1 for r in refs])[owner]
    vec = np.full((len(starts), words), np.iinfo(np.uint64).max, np.uint64)
    for step in range(int(width.max())):
        tok = np.where(step < width, ids[starts + step], v - 1)
        mask = pm[owner, tok]  # (starts, words)
        u = vec & mask
        carry = np.zeros(len(starts), np.uint64)
        total = np.empty_like(vec)
        for w in range(words):  # multiword add with carry
            s1 = vec[:, w] + u[:, w]
            s2 = s1 + carry
            carry = ((s1 < vec[:, w]) | (s2 < s1)).astype(np.uint64)
            total[:, w] = s2
        vec = total | (vec & ~mask)
    lengths = np.array([len(r) for r in refs])
    valid = np.zeros((n_ref, words), np.uint64)  # the |r| low bits of each reference
    for k, m in enumerate(lengths):
        for w in range(words):
            bits = min(64, max(0, m - 64 * w))
            valid[k, w] = np.uint64((1 << bits) - 1)
    zeros = lengths[owner] - np.bitwise_count(vec & valid[owner]).sum(1).astype(np.int64)
    out = np.zeros(n_ref, np.int64)
    np.maximum.at(out, owner, zeros)
    return out


def workloads(args) -> tuple[list[np.ndarray], dict[str, list[list[np.ndarray]]]]:
    records = foldoc_records(args.train_records)
    tok = train_bpe([r["text"] for r in records], vocab_size=8192)
    stream = np.concatenate([np.array(tok.encode(r["text"]).ids, np.int64) for r in records])
    rng = np.random.default_rng(args.seed)
    texts, cands, contained = [], [], []
    for i in range(args.sequences):
        t = stream[i * T_LEN : (i + 1) * T_LEN]
        texts.append(t)
        far = rng.integers(args.sequences * T_LEN, len(stream) - R_LEN, args.refs)
        cands.append([stream[s : s + R_LEN] for s in far])
        refs = []
        for s in rng.integers(0, T_LEN - R_LEN, args.refs):
            r = t[s : s + R_LEN].copy()
            edit = rng.choice(R_LEN, R_LEN // 20, replace=False)
            r[edit] = stream[rng.integers(0, len(stream), len(edit))]
            refs.append(r)
        contained.append(refs)
    return texts, {"candidates": cands, "contained": contained}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sequences", type=int, default=4, help="texts t of 2048 tokens")
    ap.add_argument("--refs", type=int, default=128, help="references per text")
    ap.add_argument("--naive-pairs", type=int, default=8, help="pairs per text for the naive DP")
    ap.add_argument("--bitpar-refs", type=int, default=32, help="references per text for bitpar")
    ap.add_argument("--single-refs", type=int, default=16, help="references per text, one call each")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--train-records", type=int, default=3000)
    ap.add_argument("--clock", choices=("process", "wall"), default="process")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    clock = time.process_time if args.clock == "process" else time.perf_counter
    texts, loads = workloads(args)

    print(f"# Overlap (eq. 6) benchmark: |t| = {T_LEN}, |r| = {R_LEN}, real FOLDOC tokens (BPE 8192)\n")
    print(
        f"{args.sequences} texts x {args.refs} references per workload; clock: {args.clock}; "
        f"median of {args.repeats} interleaved repeats\n"
    )
    print("| workload | method | pairs timed | pairs/s | vs naive | mean overlap |")
    print("|---|---|---|---|---|---|")
    for name, refsets in loads.items():

        def per_pair(fn, count):
            return lambda: [[fn(t, r) for r in rs[:count]] for t, rs in zip(texts, refsets)]

        def per_text(fn, count):
            return lambda: [fn(t, rs[:count]).tolist() for t, rs in zip(texts, refsets)]

        def single(t, r):
            return int(round(overlap(t, r) * len(r)))

        fns = {
            "naive DP (numpy, per window start)": (args.naive_pairs, per_pair(naive_count, args.naive_pairs)),
            "bit-parallel windows (Hyyro, numpy)": (args.bitpar_refs, per_text(bitpar_counts, args.bitpar_refs)),
            "seaweed `overlap` (one call per pair)": (args.single_refs, per_pair(single, args.single_refs)),
            "seaweed `overlap_many` (one call per text)": (args.refs, per_text(overlap_counts, args.refs)),
        }
        times: dict[str, list[float]] = {k: [] for k in fns}
        results = {}
        for _ in range(args.repeats):
            for key, (_, fn) in fns.items():
                t0 = clock()
                results[key] = fn()
                times[key].append(clock() - t0)
        # Every method is exact: they must agree wherever they computed the same pair.
        full = results["seaweed `overlap_many` (one call per text)"]
        for key, res in results.items():
            for got, want in zip(res, full):
                assert list(got) == want[: len(got)], (name, key)
        rate = {k: fns[k][0] * len(texts) / statistics.median(v) for k, v in times.items()}
        base = rate["naive DP (numpy, per window start)"]
        mean = np.mean([c / R_LEN for row in full for c in row])
        for key in fns:
            print(
                f"| {name} | {key} | {fns[key][0] * len(texts)} | {rate[key]:,.1f} | "
                f"{rate[key] / base:,.1f}x | {mean:.3f} |"
            )


if __name__ == "__main__":
    main()
