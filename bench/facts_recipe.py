"""How fast does the model learn to read its memories on the facts corpus, by packing layout?
In process (no Ray, no bank): a short warmup without memory, then training where each chunk reads
the description of the entity its text is about (oracle pairing: what BM25 retrieves for 90 % of
chunks), evaluated every few minutes on the QA probe (bank-only entities, never trained on):
greedy exact match and answer-token loss with the right memory, 5 wrong ones, and none.

    python bench/facts_recipe.py --tag packed  --seq 512 --batch 2 --d_model 128 --n_layers 4 --n_mem 2 --window 1
    python bench/facts_recipe.py --tag aligned --seq 512 --batch 4 --d_model 128 --n_layers 4 --n_mem 2 --window 1 --aligned 1
    python bench/facts_recipe.py --tag compact --batch 32 --d_model 128 --n_layers 4 --n_mem 2 --window 1 --compact 1

Layouts: packed = documents back to back in seq-token sequences (a chunk reads its majority
entity's description); aligned = one document per 64-token chunk, padded, 8 chunks a sequence
(chunking.align_docs with seq_len 512); compact = one document per sequence (align_docs with
seq_len 64, what configs/facts.yaml trains). --copy_min: a stage where each chunk reads its own
text as its memory (a copy curriculum). Results: BENCHMARKS.md, "Teaching a small model to read".
"""

import argparse
import gzip
import json
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import torch
import torch.nn.functional as F

from jobs.inference.edits import seen_in
from model.config import ModelConfig
from model.memory import encode_references, no_memories
from model.train_step import continual_memories
from model.transformer import Memory3
from pipelines.tokenizer import train_bpe

p = argparse.ArgumentParser()
p.add_argument("--data", default="data/facts")
p.add_argument("--warm_min", type=float, default=2)
p.add_argument("--cont_min", type=float, default=10)
p.add_argument("--lr", type=float, default=2e-3)
p.add_argument("--batch", type=int, default=4)
p.add_argument("--seq", type=int, default=512)
p.add_argument("--threads", type=int, default=1)
p.add_argument("--notes", type=int, default=1)
p.add_argument("--n_layers", type=int, default=6)
p.add_argument("--n_mem", type=int, default=3)
p.add_argument("--d_model", type=int, default=256)
p.add_argument("--window", type=int, default=5)
p.add_argument("--grad_refs", type=int, default=1)
p.add_argument("--eval_every", type=float, default=2)
p.add_argument("--vocab", type=int, default=4096)
p.add_argument("--seed", type=int, default=0)
p.add_argument("--tag", default="x")
p.add_argument("--copy_min", type=float, default=0)
p.add_argument("--n_eval", type=int, default=150)
p.add_argument("--compact", type=int, default=0)
p.add_argument("--aligned", type=int, default=0)
p.add_argument("--warm_mem", type=int, default=0)
a = p.parse_args()
torch.set_num_threads(a.threads)
torch.manual_seed(a.seed)
rng = random.Random(a.seed)


def rows(name):
    path = Path(a.data) / name
    opener = gzip.open if not path.exists() and path.with_suffix(".jsonl.gz").exists() else open
    path = path if path.exists() else path.with_suffix(".jsonl.gz")
    with opener(path, "rt") as f:
        return [json.loads(line) for line in f if line.strip()]


bank, train, probe = rows("bank.jsonl"), rows("train.jsonl"), rows("probe.jsonl")
if not a.notes:
    train = [d for d in train if d["kind"] != "notes"]
tok = train_bpe([d["text"] for d in bank] + [d["text"] for d in train], a.vocab)


def enc(s):
    return tok.encode(s, add_special_tokens=False).ids


ref = {d["id"]: enc(d["text"])[:128] for d in bank}
ids = list(ref)
hd = 32
cfg = ModelConfig.from_preset(
    "small",
    vocab_size=a.vocab,
    max_seq_len=a.seq,
    mem_top_k=128,
    n_layers=a.n_layers,
    n_mem_layers=a.n_mem,
    d_model=a.d_model,
    n_heads=a.d_model // hd,
    head_dim=hd,
    n_kv_heads=max(1, a.d_model // hd // 4),
    mlp_hidden=3 * a.d_model,
)
model = Memory3(cfg)
CS = cfg.mem_chunk_size
print(a.tag, json.dumps(vars(a)), "params", sum(p.numel() for p in model.parameters()), flush=True)


def pack():
    order = list(range(len(train)))
    rng.shuffle(order)
    buf, owner = [cfg.bos_id], [None]
    for i in order:
        d = train[i]
        t = enc(d["text"]) + [cfg.eos_id]
        buf += t
        owner += [(d["entity"], d["kind"])] * len(t)
        while len(buf) >= a.seq:
            s, o = buf[: a.seq], owner[: a.seq]
            buf, owner = [cfg.bos_id] + buf[a.seq :], [None] + owner[a.seq :]
            chunks = []
            for c in range(a.seq // CS):
                cnt = {}
                for x in o[c * CS : (c + 1) * CS]:
                    if x:
                        cnt[x] = cnt.get(x, 0) + 1
                best = max(cnt, key=cnt.get) if cnt else None
                chunks.append(None if best is None or best[1] == "notes" else best[0])
            yield s, chunks


def compact_batches():
    while True:
        order = list(range(len(train)))
        rng.shuffle(order)
        for j in range(0, len(order) - a.batch, a.batch):
            docs = [train[i] for i in order[j : j + a.batch]]
            seqs = [([cfg.bos_id] + enc(d["text"]) + [cfg.eos_id])[:CS] for d in docs]
            T = max(len(x) for x in seqs)
            yield [
                (x + [cfg.pad_id] * (T - len(x)), [None if d["kind"] == "notes" else d["entity"]])
                for x, d in zip(seqs, docs)
            ]


def aligned_batches():
    # each doc alone in its 64-token chunk (pad after it), seq/64 chunks per sequence, no doc mask
    C = a.seq // CS
    while True:
        order = list(range(len(train)))
        rng.shuffle(order)
        per = a.batch * C
        for j in range(0, len(order) - per, per):
            docs = [train[i] for i in order[j : j + per]]
            out = []
            for r in range(a.batch):
                s, ch = [], []
                for d in docs[r * C : (r + 1) * C]:
                    x = ([cfg.bos_id] if not s else []) + enc(d["text"]) + [cfg.eos_id]
                    x = x[:CS]
                    s += x + [cfg.pad_id] * (CS - len(x))
                    ch.append(None if d["kind"] == "notes" else d["entity"])
                out.append((s, ch))
            yield out


def batches():
    if a.aligned:
        yield from aligned_batches()
    if a.compact:
        yield from compact_batches()
    while True:
        g = pack()
        b = []
        for s in g:
            b.append(s)
            if len(b) == a.batch:
                yield b
                b = []


def ref_tensor(idlist):
    T = max([len(ref[i]) for i in idlist if i] or [1])
    out = torch.full((len(idlist), T), cfg.pad_id, dtype=torch.long)
    for j, i in enumerate(idlist):
        if i:
            out[j, : len(ref[i])] = torch.tensor(ref[i])
    return out


def step_loss(b, memory):
    tokens = torch.tensor([s for s, _ in b])
    if memory == "copy":  # each chunk reads its own text as its memory
        if a.compact:
            rt = tokens[:, None, :]
            C = 1
        else:
            C = a.seq // CS
            rt = tokens.view(len(b), C, CS)
        valid = torch.ones(len(b), C, dtype=torch.bool)
        mem, mask = continual_memories(
            model, rt, valid, window=1, schedule="paper", grad_through_refs=bool(a.grad_refs)
        )
        logits = model(tokens, mem, mask)
    elif not memory:
        logits = model(tokens)
    else:
        C = len(b[0][1])
        flat = [c for _, ch in b for c in ch]
        rt = ref_tensor(flat).view(len(b), C, -1)
        valid = torch.tensor([c is not None for c in flat]).view(len(b), C)
        mem, mask = continual_memories(
            model, rt, valid, window=a.window, schedule="paper", grad_through_refs=bool(a.grad_refs)
        )
        logits = model(tokens, mem, mask)
    return F.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1), ignore_index=cfg.pad_id
    )


ev = random.Random(5).sample(probe, a.n_eval)
erng = random.Random(7)
ev_mems = {}
for k, it in enumerate(ev):
    src = it["source_ids"][0]
    others = erng.sample(ids, 5)
    m5 = [src] + [o for o in others if o != src][:4]
    erng.shuffle(m5)
    ev_mems[k] = {"right1": [src], "right5": m5, "wrong5": [o for o in others if o != src][:5]}

train_text = "\n".join(d["text"] for d in train)
seen = seen_in(train_text, [it["answer"] for it in ev])


@torch.no_grad()
def evaluate(label, step):
    model.eval()
    out = {}
    by_seen = {True: [], False: []}
    for mode in ("right1", "wrong5", "none"):
        em = 0
        nll = 0
        n = 0
        for k, it in enumerate(ev):
            pr = [cfg.bos_id] + enc(it["prompt"])
            an = enc(it["answer"])
            x = torch.tensor([pr + an])
            if mode == "none":
                logits = model(x, *no_memories(cfg, 1, 1))
            else:
                e = encode_references(model, ref_tensor(ev_mems[k][mode]), top_k=128)
                logits = model(x, e.kv[None, None], e.mask[None, None])
            lg = logits[0, len(pr) - 1 : len(pr) - 1 + len(an)]
            y = torch.tensor(an)
            hit = bool((lg.argmax(-1) == y).all())
            em += hit
            nll += F.cross_entropy(lg, y, reduction="sum").item()
            n += len(an)
            if mode == "right1":
                by_seen[seen[k]].append(hit)
        out[mode] = (round(em / len(ev), 3), round(nll / n, 3))
    # exact match with the right memory, split by whether the answer occurs in the training text
    out["right1_seen_unseen"] = [f"{sum(h)}/{len(h)}" for h in (by_seen[True], by_seen[False])]
    model.train()
    print(a.tag, json.dumps({"at": label, "step": step, **out}), flush=True)


opt = torch.optim.AdamW(model.parameters(), lr=a.lr, betas=(0.9, 0.95), weight_decay=0.1)
gen = batches()
for stage, minutes in (("warmup", a.warm_min), ("copy", a.copy_min), ("continual", a.cont_min)):
    t0 = time.time()
    step = 0
    last = t0
    ls = []
    while time.time() - t0 < minutes * 60:
        lr = a.lr * min(1, (step + 1) / 30)
        for g in opt.param_groups:
            g["lr"] = lr
        loss = step_loss(
            next(gen), "copy" if stage == "copy" else (stage == "continual" or (stage == "warmup" and a.warm_mem))
        )
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        ls.append(loss.item())
        step += 1
        if time.time() - last > a.eval_every * 60:
            print(
                a.tag,
                stage,
                step,
                round(sum(ls[-20:]) / len(ls[-20:]), 3),
                round((time.time() - t0) / step, 2),
                "s/step",
                flush=True,
            )
            if stage != "warmup":
                evaluate(f"{stage}", step)
            last = time.time()
    print(a.tag, stage, "done", step, "steps", round(sum(ls[-20:]) / 20, 3), flush=True)
    evaluate(f"{stage} end", step)
