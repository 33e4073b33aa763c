"""`m3 generate`: text from the model with explicit memory (or the none / rag baselines).

    m3 generate -c configs/demo.yaml "A compiler is" --max-new-tokens 64 --show-memories
    m3 generate -c configs/demo.yaml --prompts prompts.jsonl --mode rag --output out.jsonl
    m3 generate -c configs/demo.yaml "A compiler is" --build -1     # the build before live

A JSONL of prompts holds one JSON string or {"prompt": ...} object per line; prompts are
generated in batches of infer.batch_size. `sample_generation` is the helper the run report
uses: one prompt, its text, and the references each chunk read.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from jobs.config import ConfigError


def read_prompts(path: str) -> list[str]:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"--prompts: no such file {path}")
    out = []
    for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as e:
            raise ConfigError(f"--prompts {path}:{n}: not valid JSON: {e}") from None
        text = item.get("prompt") if isinstance(item, dict) else item
        if not isinstance(text, str):
            raise ConfigError(
                f"--prompts {path}:{n}: expected a JSON string or an object with a string 'prompt', got {line[:80]!r}"
            )
        out.append(text)
    return out


def describe(inf, out) -> dict:
    """An output as plain data: the text and, per chunk, the references it read (with text)."""
    ids = [r for c in out.reads for r in c.ref_ids] + out.rag_refs
    texts = inf.ref_texts(ids)
    chunks = [
        {
            "tokens": [c.start, c.end],
            "query_tokens": [c.query_start, c.query_end],
            "refs": [{"ref_id": r, "text": texts.get(r, "")} for r in c.ref_ids],
        }
        for c in out.reads
    ]
    d = {"mode": out.mode, "text": out.text, "new_tokens": len(out.tokens), "chunks": chunks}
    if out.mode == "rag":
        d["rag_refs"] = [{"ref_id": r, "text": texts.get(r, "")} for r in out.rag_refs]
    return d


def sample_generation(cfg, prompt: str, max_new_tokens: int = 64, mode: str = "memory", inference=None) -> dict:
    """One prompt's continuation and which references each chunk read (for the run report)."""
    from jobs.inference.engine import Inference

    inf = inference or Inference(cfg)
    out = inf.generate([prompt], mode, max_new_tokens=max_new_tokens)[0]
    return {"prompt": prompt, "model_hash": inf.model_hash, **describe(inf, out)}


def show_reads(d: dict) -> str:
    lines = []
    for c in d["chunks"]:
        (s, e), (qs, qe) = c["tokens"], c["query_tokens"]
        lines.append(f"  tokens [{s}, {e}) read the memories retrieved by tokens [{qs}, {qe}):")
        lines += [f"    {r['ref_id']}  {r['text'][:100].replace(chr(10), ' ')}" for r in c["refs"]] or ["    (none)"]
    for r in d.get("rag_refs", []):
        lines.append(f"  prepended {r['ref_id']}  {r['text'][:100].replace(chr(10), ' ')}")
    return "\n".join(lines)


def generate_prompts(
    cfg, prompts: list[str], build: str | None = None, output: str | None = None, show_memories: bool = False
) -> int:
    """`m3 generate` (its arguments: jobs/cli/generate.py): each prompt's continuation on stdout,
    with the sampling of cfg.infer; `output`: one JSON object per prompt written there too."""
    from jobs.inference.engine import Inference

    inf = Inference(cfg, build=build)
    outs = inf.generate(prompts)
    sink = open(output, "w", encoding="utf-8") if output else None
    try:
        for prompt, out in zip(prompts, outs):
            d = {"prompt": prompt, **describe(inf, out)}
            if sink:
                sink.write(json.dumps(d) + "\n")
            print(f"{prompt}{out.text}" if len(prompts) == 1 else json.dumps({"prompt": prompt, "text": out.text}))
            if show_memories:
                print(show_reads(d))
    finally:
        if sink:
            sink.close()
    if show_memories and inf._store is not None:
        print(f"memory cache: {inf._store.hits} hits, {inf._store.misses} misses", file=sys.stderr)
    return 0
