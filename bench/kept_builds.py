"""What kept builds cost on disk, and what a 1 % rebuild costs against a full build (issue 26).

    .venv/bin/python bench/kept_builds.py [--refs 10000] [--dir /tmp/m3-kept]

One bank of about N references (bench/scale.py's corpus and settings: the `tiny` model in the
paper's memory format, the static-minilm retriever and its IVF_HNSW_SQ index), built by `m3
rebuild` with `rebuild.keep_builds=3`, then three rebuilds, each after another 1 % of the
documents was edited. Printed: the bytes on disk of each table after the first build and after
the three rebuilds (three kept builds: the goal is <= 1.3x one build), the wall seconds of each
rebuild against the first (the goal is <= 5 %), and what each rebuild's stages did.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path

os.environ.setdefault("M3_PROGRESS", "0")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.append(str(Path(__file__).resolve().parent))

from scale import MARGIN, REFS_PER_DOC, ROOT, SETTINGS, disk  # noqa: E402
from scale_corpus import Corpus  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--refs", type=int, default=10_000)
    ap.add_argument("--dir", default="/tmp/m3-kept")
    ap.add_argument("--rebuilds", type=int, default=3)
    ap.add_argument(
        "--existing",
        default=None,
        help="a bench/scale.py size directory (DIR/corpus, DIR/bank): rebuild that bank, built no more here",
    )
    ap.add_argument("--full-s", type=float, default=None, help="with --existing: its full build's seconds")
    a = ap.parse_args()

    from jobs.config import load_config
    from jobs.ops.rebuild import run_rebuild
    from jobs.runtime import init_ray, quiet_ray_data

    work = Path(a.existing or a.dir)
    if not a.existing:
        shutil.rmtree(work, ignore_errors=True)
    corpus, n_docs = Corpus(), math.ceil(a.refs / REFS_PER_DOC * MARGIN)
    if a.existing:  # the corpus as bench/scale.py wrote it (its two files), not written again
        both, only_bank = work / "corpus" / "train.jsonl.gz", work / "corpus" / "bank.jsonl.gz"
    else:
        both, only_bank = corpus.write(work / "corpus", n_docs)
    bank = work / "bank"
    overrides = [
        f"corpus.paths=[{both}, {only_bank}]",
        f"corpus.roles={{{both}: both, {only_bank}: bank}}",
        f"bank.uri={bank}",
        "rebuild.keep_builds=3",
        *SETTINGS,
    ]
    init_ray(load_config(ROOT / "configs" / "demo.yaml", overrides).ray)  # Ray's start is in no figure
    quiet_ray_data()

    def rebuild() -> tuple[float, dict]:
        w = time.perf_counter()
        out = run_rebuild(load_config(ROOT / "configs" / "demo.yaml", overrides))
        return time.perf_counter() - w, out

    if a.existing:  # published by bench/scale.py's unchanged rebuild; its full build timed there
        full_s, first = a.full_s, {}
    else:
        full_s, first = rebuild()
    one = disk(bank)
    rounds = []
    for r in range(1, a.rebuilds + 1):
        corpus.write(work / "corpus", n_docs, edit_every=100, revision=r)
        s, out = rebuild()
        rounds.append(
            {
                "seconds": round(s, 1),
                "vs_full": round(s / full_s, 3),
                "timings": out.get("timings"),
                "memories": out.get("memories"),
                "embeddings": {k: v for k, v in (out.get("embeddings") or {}).items() if k != "timings"},
            }
        )
        print(f"[kept] rebuild {r}: {s:.1f} s = {s / full_s:.3f} of the first build ({full_s:.1f} s)", flush=True)
    kept = disk(bank)
    refs = first.get("references") or a.refs
    print(f"\nbank of ~{a.refs:,} references; first build {full_s:.1f} s")
    print(f"{'table':<40} {'one build':>12} {'3 kept':>12} {'ratio':>7}")
    for t in sorted(set(one) | set(kept)):
        b1, b3 = one.get(t, 0), kept.get(t, 0)
        print(f"{t:<40} {b1:>12,} {b3:>12,} {b3 / b1 if b1 else float('nan'):>7.2f}")
    t1, t3 = sum(one.values()), sum(kept.values())
    print(f"{'total':<40} {t1:>12,} {t3:>12,} {t3 / t1:>7.2f}")
    for i, r in enumerate(rounds, 1):
        print(f"rebuild {i}: {r['seconds']} s ({r['vs_full']:.3f} of full); stages {r['timings']}")
    out = work / f"kept_builds{'-existing' if a.existing else ''}.json"
    out.write_text(json.dumps({"refs": refs, "full_s": full_s, "one": one, "kept": kept, "rounds": rounds}, indent=1))
    print(out)
    import ray

    ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
