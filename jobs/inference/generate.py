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
            raise ConfigError(f"--prompts {path}:{n}: expected a JSON string or an object with a string "
                              f"'prompt', got {line[:80]!r}")
        out.append(text)
    return out


def describe(inf, out) -> dict:
    """An output as plain data: the text and, per chunk, the references it read (with text)."""
    ids = [r for c in out.reads for r in c.ref_ids] + out.rag_refs
    texts = inf.ref_texts(ids)
    chunks = [{"tokens": [c.start, c.end], "query_tokens": [c.query_start, c.query_end],
               "refs": [{"ref_id": r, "text": texts.get(r, "")} for r in c.ref_ids]} for c in out.reads]
    d = {"mode": out.mode, "text": out.text, "new_tokens": len(out.tokens), "chunks": chunks}
    if out.mode == "rag":
        d["rag_refs"] = [{"ref_id": r, "text": texts.get(r, "")} for r in out.rag_refs]
    return d


def sample_generation(cfg, prompt: str, max_new_tokens: int = 64, mode: str = "memory",
                      inference=None) -> dict:
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


def cmd_generate(cfg, args) -> int:
    if (args.prompt is None) == (args.prompts is None):
        raise ConfigError("m3 generate: give one prompt as an argument or --prompts FILE.jsonl")
    if args.max_new_tokens is not None and args.max_new_tokens < 1:
        raise ConfigError(f"--max-new-tokens: expected a value >= 1, got {args.max_new_tokens}")
    if args.temperature is not None and args.temperature < 0:
        raise ConfigError(f"--temperature: expected a value >= 0, got {args.temperature}")
    if args.top_p is not None and not 0 < args.top_p <= 1:
        raise ConfigError(f"--top-p: expected a value in (0, 1], got {args.top_p}")
    prompts = [args.prompt] if args.prompt is not None else read_prompts(args.prompts)
    from jobs.inference.engine import Inference

    inf = Inference(cfg, build=args.build)
    outs = inf.generate(prompts, args.mode, max_new_tokens=args.max_new_tokens,
                        temperature=args.temperature, top_p=args.top_p)
    sink = open(args.output, "w", encoding="utf-8") if args.output else None
    try:
        for prompt, out in zip(prompts, outs):
            d = {"prompt": prompt, **describe(inf, out)}
            if sink:
                sink.write(json.dumps(d) + "\n")
            print(f"{prompt}{out.text}" if len(prompts) == 1 else json.dumps({"prompt": prompt, "text": out.text}))
            if args.show_memories:
                print(show_reads(d))
    finally:
        if sink:
            sink.close()
    if args.show_memories and inf._store is not None:
        print(f"memory cache: {inf._store.hits} hits, {inf._store.misses} misses", file=sys.stderr)
    return 0


def add_parser(sub, common) -> None:
    g = sub.add_parser("generate", parents=[common], help="generate text with explicit memory (or none / rag)")
    g.add_argument("prompt", nargs="?", help="the prompt (or --prompts FILE.jsonl)")
    g.add_argument("--prompts", help="JSONL: one JSON string or {\"prompt\": ...} per line, generated in batches")
    g.add_argument("--mode", choices=("memory", "none", "rag"), default=None, help="default: infer.mode")
    g.add_argument("--max-new-tokens", type=int, default=None)
    g.add_argument("--temperature", type=float, default=None, help="0 = greedy (default: infer.temperature)")
    g.add_argument("--top-p", type=float, default=None)
    g.add_argument("--show-memories", action="store_true", help="print the references each chunk read")
    g.add_argument("--build", help="serve a published build (its number, `live`, -1 = the one before live) "
                                   "instead of the live one, with the model its memories were written by")
    g.add_argument("--output", help="write one JSON object per prompt (text, chunks, references) here")
