"""`m3 import-model` on a random model of a real model's shape: wall time and peak memory.

    .venv/bin/python bench/hf_import.py bench [--shape qwen2-0.5b] [--dir /tmp/hf-bench]
    .venv/bin/python bench/hf_import.py demo-model DIR    # a small random Llama + a BPE of FOLDOC

`bench` builds the shape with transformers (random weights, float32, saved as safetensors),
then imports it in a fresh process so the peak RSS (ru_maxrss) is the import's alone, and
reports it against the size of the weights (issue 28's goal: <= 60 s, <= 1.2x the size).

`demo-model` writes what a user brings, at demo size: a LlamaForCausalLM with random weights and
a byte-level BPE tokenizer.json trained on the FOLDOC corpus (Llama's own special tokens, no
`<ref>`), for `m3 import-model DIR` and the end-to-end run README's "Start from a pretrained
model" describes.
"""

from __future__ import annotations

import argparse
import gzip
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# Qwen2.5-0.5B's published shape (494M parameters, tied embeddings, q/k/v biases)
SHAPES = {
    "qwen2-0.5b": dict(
        arch="Qwen2",
        vocab_size=151936,
        hidden_size=896,
        intermediate_size=4864,
        num_hidden_layers=24,
        num_attention_heads=14,
        num_key_value_heads=2,
        tie_word_embeddings=True,
        max_position_embeddings=32768,
        bos_token_id=151643,
        eos_token_id=151643,
    ),
}


def _bpe_tokenizer(vocab_size: int, special: list[str], texts) -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=special,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return tok.to_str()


def make_shape(directory: Path, shape: str) -> int:
    """The shape with random weights, saved; returns the bytes of its safetensors."""
    import torch
    import transformers

    spec = dict(SHAPES[shape])
    arch = spec.pop("arch")
    cfg = getattr(transformers, f"{arch}Config")(**spec)
    with torch.device("meta"):
        model = getattr(transformers, f"{arch}ForCausalLM")(cfg)
    model = model.to_empty(device="cpu").float()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
    model.save_pretrained(directory)
    # a tokenizer whose length is the vocab's minus the padding Qwen's matrices carry
    vocab = {f"t{i}": i for i in range(151643)}
    added = [
        dict(id=151643 + i, content=c, special=True)
        for i, c in enumerate(["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    ]
    (directory / "tokenizer.json").write_text(
        json.dumps({"model": {"type": "BPE", "vocab": vocab, "merges": []}, "added_tokens": added})
    )
    return sum(p.stat().st_size for p in directory.glob("*.safetensors"))


def bench(args) -> None:
    src = Path(args.dir) / args.shape
    if not (src / "config.json").exists():
        t0 = time.perf_counter()
        src.mkdir(parents=True, exist_ok=True)
        make_shape(src, args.shape)
        print(f"built {args.shape} in {time.perf_counter() - t0:.1f} s")
    size = sum(p.stat().st_size for p in src.glob("*.safetensors"))
    out = Path(args.dir) / f"{args.shape}-m3"
    # VmHWM, the child's own high-water mark: ru_maxrss would carry this process's RSS (the
    # model transformers just built) over the fork into the child
    peak = "int(next(l for l in open('/proc/self/status') if l.startswith('VmHWM')).split()[1]) * 1024"
    code = (
        "import json, sys, time; sys.path.insert(0, %r)\n"
        "import torch\n"
        "base = %s\n"
        "from model.hf_import import import_hf\n"
        "t0 = time.perf_counter(); r = import_hf(%r, %r)\n"
        "print(json.dumps({'seconds': time.perf_counter() - t0, 'peak_rss': %s, 'base_rss': base, "
        "'params': r['parameters'], 'added': r['added_rows']}))"
    ) % (str(ROOT), peak, str(src), str(out), peak)
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    res = json.loads(run.stdout.strip().splitlines()[-1])
    torch_rss = res["base_rss"]
    print(
        f"{args.shape}: {res['params']:,} parameters, weights {size / 2**20:,.0f} MiB; import {res['seconds']:.1f} s, "
        f"peak RSS {res['peak_rss'] / 2**20:,.0f} MiB = {res['peak_rss'] / size:.2f}x the weights "
        f"(of which {torch_rss / 2**20:,.0f} MiB is python + torch imported); added {[(a['token'], a['id']) for a in res['added']]}"
    )


def demo_model(args) -> None:
    """A random LlamaForCausalLM of demo size with a BPE of FOLDOC (Llama's <unk>, <s>, </s>)."""
    import torch
    import transformers

    out = Path(args.dir)
    out.mkdir(parents=True, exist_ok=True)

    def texts():
        with gzip.open(ROOT / "data" / "foldoc" / "foldoc.jsonl.gz", "rt", encoding="utf-8") as f:
            for line in f:
                yield json.loads(line)["text"]

    tok = _bpe_tokenizer(args.vocab, ["<unk>", "<s>", "</s>"], texts())
    (out / "tokenizer.json").write_text(tok)
    n = json.loads(tok)["model"]["vocab"].__len__()
    cfg = transformers.LlamaConfig(
        vocab_size=n,
        hidden_size=128,
        intermediate_size=384,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
        rope_parameters=dict(rope_type="default", rope_theta=10000.0),
    )
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(cfg).save_pretrained(out)
    print(f"demo-model: random LlamaForCausalLM ({n} tokens, 4 x 128) in {out}")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("bench")
    b.add_argument("--shape", choices=sorted(SHAPES), default="qwen2-0.5b")
    b.add_argument("--dir", default="/tmp/hf-bench")
    d = sub.add_parser("demo-model")
    d.add_argument("dir")
    d.add_argument("--vocab", type=int, default=4096)
    a = p.parse_args()
    {"bench": bench, "demo-model": demo_model}[a.cmd](a)
