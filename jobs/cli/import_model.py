"""`m3 import-model DIR` and `m3 export-model OUT`: start from a pretrained Hugging Face model,
and hand the continual model back in transformers' format (model/hf_import.py, hf_export.py).

    m3 import-model ~/models/SmolLM2-135M -c configs/demo.yaml     # -> <bank>/models/hf-SmolLM2-135M
    m3 ingest -c <bank>/models/hf-SmolLM2-135M/m3.yaml             # the bank, cut by its tokenizer
    m3 run -c <bank>/models/hf-SmolLM2-135M/m3.yaml --from embed   # continual from the import
    m3 export-model out/ -c <bank>/models/hf-SmolLM2-135M/m3.yaml  # the continual model, HF-style

The import writes m3.yaml beside the checkpoint: a config that extends the one given and names
the imported model (its whole `model:` section, special ids included), its tokenizer and
`train.warmup_checkpoint`, so every later command reads the same model without hand-editing.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

DTYPES = ("source", "float32", "bfloat16")


def add_parsers(sub, common: argparse.ArgumentParser) -> None:
    imp = sub.add_parser(
        "import-model",
        parents=[common],
        help="a local Hugging Face model directory (Llama, Qwen2, Qwen3, Mistral) -> this project's checkpoint",
    )
    imp.add_argument("source", metavar="DIR", help="config.json, *.safetensors and tokenizer.json")
    imp.add_argument("--out", help="checkpoint directory (default <bank>/models/hf-<DIR's name>)")
    imp.add_argument("--dtype", choices=DTYPES, default="float32", help="of the written weights (default float32)")
    exp = sub.add_parser(
        "export-model", parents=[common], help="a checkpoint (default: the continual model) -> a HF-style directory"
    )
    exp.add_argument("out", metavar="OUT")
    exp.add_argument("--checkpoint", help="the model to export (default <bank>/training/continual/model)")
    exp.add_argument(
        "--arch",
        choices=("LlamaForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM", "MistralForCausalLM"),
        help="default: by the biases",
    )


def cmd_import_model(cfg, args) -> int:
    import yaml

    from model.hf_config import MEMORY_FIELDS
    from model.hf_import import import_hf

    out = Path(args.out) if args.out else _models_dir(cfg) / f"hf-{Path(args.source).resolve().name}"
    memory = {k: getattr(cfg.model, k) for k in MEMORY_FIELDS}
    memory["max_seq_len"] = cfg.model.max_seq_len  # the context the config trains on (capped below)
    dtype = None if args.dtype == "source" else _torch_dtype(args.dtype)
    t0 = time.perf_counter()
    report = import_hf(args.source, out, memory=memory, dtype=dtype)
    took = time.perf_counter() - t0
    model_cfg = _model_section(out)
    derived = {
        **({"extends": str(Path(cfg.source).resolve())} if cfg.source else {}),
        **_overrides(args.overrides),  # what --set changed travels with the config
    }
    # the imported model's sections win over the same keys given with --set
    derived["model"] = model_cfg
    derived.setdefault("tokenizer", {})["path"] = str((out / "tokenizer.json").resolve())
    derived.setdefault("train", {})["warmup_checkpoint"] = str(out.resolve())
    config = out / "m3.yaml"
    header = (
        f"# written by `m3 import-model {args.source}`: the bank built with this model's tokenizer, the\n"
        f"# continual stage started from it. m3 ingest -c {config} && m3 run -c {config} --from embed\n"
    )
    config.write_text(header + yaml.safe_dump(derived, sort_keys=False))
    print(
        f"m3 import-model: {report['architecture']} from {args.source} -> {out} in {took:.1f} s: "
        f"{report['parameters']:,} parameters ({report['dtype']}), model {report['model_hash'][:16]}"
    )
    ids = report["special_ids"]
    print(f"  special ids: pad {ids['pad_id']}, bos {ids['bos_id']}, eos {ids['eos_id']}, <ref> {ids['ref_bos_id']}")
    for a in report["added_rows"]:
        where = "a new row" if a["new_row"] else "a spare row of the matrix"
        print(f"  added {a['token']} ({a['role']}) as id {a['id']} on {where}: {a['init']}")
    if not report["added_rows"]:
        print("  added no rows: the tokenizer has every token the model needs")
    m = report["memory"]
    print(
        f"  memory layers 0-{m['n_mem_layers'] - 1} of {model_cfg['n_layers']} read memories with no new weights "
        f"(top-{m['mem_top_k']}, chunks of {m['mem_chunk_size']}, references <= {m['ref_max_tokens']} tokens)"
    )
    print(f"  config: {config} (m3 ingest -c {config} && m3 run -c {config} --from embed)")
    return 0


def cmd_export_model(cfg, args) -> int:
    from model.hf_export import export_hf

    if args.checkpoint:
        src = Path(args.checkpoint)
    else:
        from storage.bank import Bank

        src = Bank.of(cfg).trained_model("continual")
    hf = export_hf(
        src, args.out, tokenizer=cfg.tokenizer.path if not (src / "tokenizer.json").exists() else None, arch=args.arch
    )
    print(
        f"m3 export-model: {src} -> {args.out} as {hf['architectures'][0]} "
        f"({hf['num_hidden_layers']} layers, vocab {hf['vocab_size']}); transformers loads it with "
        f"AutoModelForCausalLM.from_pretrained({str(args.out)!r})"
    )
    return 0


def _overrides(overrides) -> dict:
    """--set KEY=VALUE (or a flag's (key, value, flag)) as nested YAML sections."""
    import yaml

    out: dict = {}
    for item in overrides:
        key, value = item[:2] if isinstance(item, tuple) else item.split("=", 1)
        *parents, leaf = key.split(".")
        node = out
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = yaml.safe_load(value) if isinstance(value, str) else value
    return out


def _models_dir(cfg) -> Path:
    from storage.bank import Bank

    return Bank.of(cfg).layout.models()


def _model_section(out: Path) -> dict:
    import json

    from model.files import CONFIG_FILE

    return json.loads((out / CONFIG_FILE).read_text())


def _torch_dtype(name: str):
    import torch

    return getattr(torch, name)


COMMANDS = {"import-model": cmd_import_model, "export-model": cmd_export_model}
