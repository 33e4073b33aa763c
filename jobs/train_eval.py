"""Held-out evidence of the two training stages (jobs/train.py): the loss of a checkpoint with
and without the memories of each chunk's neighbors, paired per sequence, and the control that
gives each sequence another sequence's memories."""

from __future__ import annotations

import json
from pathlib import Path

from jobs.train import stage_dir, warmup_model_dir
from jobs.train_config import TrainConfig


def evaluate(cfg, checkpoint: str | Path, split: str = "heldout", train: TrainConfig | None = None,
             with_memory: bool = True) -> dict:
    """Mean loss per target token over (up to eval_sequences of) a split, without memory and,
    if the bank has neighbors and with_memory, with the memories of each chunk's neighbors
    (encoded by this checkpoint, sparsified as its training was)."""
    import torch

    from model import load_model
    from model.train_step import continual_memories, lm_loss
    from pipelines.train_data import ShardReader
    from storage.bank import Bank

    tc = train if train is not None else getattr(cfg, "train", None) or TrainConfig()
    model = load_model(checkpoint)
    export = Path(checkpoint) / "export.json"
    sparsify = json.loads(export.read_text()).get("sparsify_refs", tc.sparsify_refs) if export.exists() else tc.sparsify_refs
    with_memory = with_memory and Bank(cfg.bank.uri).has("neighbors")
    reader = ShardReader(cfg.bank.uri, micro_batch=1, split=split, heldout_fraction=tc.heldout_fraction,
                         neighbors=with_memory, chunk_size=model.config.mem_chunk_size,
                         max_tokens=tc.max_tokens or model.config.max_seq_len, shuffle=False)
    from itertools import islice

    batches = list(islice(reader.epoch_batches(), tc.eval_sequences))  # micro_batch 1: a sequence each
    per_seq = []  # (seq_id, target tokens, loss, with its memories, with another sequence's)
    with torch.no_grad():
        for i, b in enumerate(batches):
            w = (b["tokens"][:, 1:] != model.config.pad_id).sum().item()
            row = [b["seq_ids"][0], w, lm_loss(model, b["tokens"]).item(), None, None]
            if with_memory:
                # the control: the neighbors of a sequence half the split away, so a gain that
                # comes from attending to any extra tokens shows up on both sides
                other = batches[(i + len(batches) // 2) % len(batches)]
                for col, src in ((3, b), (4, other)):
                    mem, mask = continual_memories(model, src["ref_tokens"], src["ref_valid"], window=tc.window,
                                                   sparsify=sparsify, grad_through_refs=False)
                    row[col] = lm_loss(model, b["tokens"], mem, mask).item()
            per_seq.append(tuple(row))
    n_tok = sum(r[1] for r in per_seq)
    mean = lambda col: sum(r[col] * r[1] for r in per_seq) / max(n_tok, 1)  # noqa: E731
    out = {"split": split, "sequences": len(per_seq), "tokens": n_tok, "loss": mean(2), "per_sequence": per_seq}
    if with_memory:
        out["loss_memory"], out["loss_other_memory"] = mean(3), mean(4)
    return out


def paired_gain(per_seq: list[tuple], col: int = 3) -> dict:
    """Loss without minus with memory (column col of evaluate's per_sequence), per sequence:
    its mean, standard error and how many sequences it helped. The same sequences on both
    sides, so the spread between sequences cancels."""
    import statistics

    d = [r[2] - r[col] for r in per_seq if r[col] is not None]
    if len(d) < 2:
        return {}
    return {"mean_gain": statistics.fmean(d), "stderr": statistics.stdev(d) / len(d) ** 0.5,
            "helped": sum(x > 0 for x in d), "of": len(d)}


def memory_evidence(cfg, tc: TrainConfig) -> dict:
    """Held-out loss of the warmup model, and of the continual model with and without memory."""
    warm = evaluate(cfg, warmup_model_dir(cfg, tc), train=tc, with_memory=False)
    cont = evaluate(cfg, stage_dir(cfg, "continual") / "model", train=tc)
    out = {"split": "heldout", "sequences": cont["sequences"], "tokens": cont["tokens"],
           "warmup_loss": warm["loss"], "continual_loss_no_memory": cont["loss"],
           "continual_loss_memory": cont.get("loss_memory"),
           "continual_loss_other_memory": cont.get("loss_other_memory"),
           "paired": paired_gain(cont["per_sequence"]), "paired_other": paired_gain(cont["per_sequence"], col=4)}
    p = out["paired"]
    print("evidence (held-out): " + ", ".join(f"{k} {v:.4f}" for k, v in out.items() if isinstance(v, float))
          + (f"; memory lowers the loss by {p['mean_gain']:.4f} +- {p['stderr']:.4f} nats/token per sequence, "
             f"{p['helped']} of {p['of']} sequences" if p else ""), flush=True)
    return out
