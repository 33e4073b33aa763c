"""Held-out evidence of the training stages (jobs/training/trainer.py), by the same scoring path as
`m3 eval` (jobs/inference/evaluate.py): the warmup model without memory, and the continual model without
memory (sink kept), with the memories the serving schedule retrieves (encoded on the fly by the
model at the sparsity and through the codec it was trained with: what the bank will serve once
encoded), and with another sequence's memories (the control). Paired per sequence."""

from __future__ import annotations

from pathlib import Path

from jobs.config.train import TrainConfig
from jobs.models import warmup_model_dir
from jobs.training.codec import memory_codec
from storage.bank import Bank


def evaluate_checkpoint(
    cfg, bank: Bank, checkpoint: str | Path, tc: TrainConfig, with_memory: bool = True, probe: bool = False
) -> dict:
    """Mean loss of a checkpoint over (up to eval_sequences of) the held-out split, in modes none
    and, if with_memory and it reads memories, memory and the control; with probe also the
    knowledge probe of `m3 eval` (infer.eval.probe_refs references)."""
    from jobs.inference.engine import bank_retriever, bank_tokenizer
    from jobs.inference.evaluate import evaluate_items, heldout_items, probe_items, probe_modes, reads_memory, strict
    from jobs.inference.retriever import EncodingStore
    from model import load_model
    from model.checkpoint import memory_reading

    model = load_model(checkpoint).eval()
    mc = model.config
    items = heldout_items(
        bank, tc.heldout_fraction, tc.eval_sequences, tc.max_tokens or mc.max_seq_len, mc.mem_chunk_size
    )
    sink = reads_memory(checkpoint)
    held = strict(cfg.infer.max_overlap)
    modes = {"none": ("none", None, held)}
    retriever = None
    if with_memory and sink:
        reading = memory_reading(checkpoint)
        retriever = bank_retriever(cfg, bank, bank_tokenizer(bank), mc.mems_per_chunk)
        store = EncodingStore(
            model,
            retriever.ref_tokens,
            top_k=reading.get("top_k"),
            codec=memory_codec(cfg, tc) if reading.get("codec") else None,
        )
        retriever = retriever.with_store(store)
        modes.update({"memory": ("memory", None, held), "memory, another sequence's (control)": ("other", None, held)})
    out = evaluate_items(
        model, items, sink=sink, modes=modes, retriever=retriever, batch_size=cfg.infer.eval.batch_size
    )
    result = {"sequences": len(items), "tokens": out["none"]["tokens"], "sink": sink, "modes": out}
    if probe:
        pitems, n_docs = probe_items(
            bank, bank_tokenizer(bank), tc.heldout_fraction, cfg.infer.eval.probe_refs, mc.eos_id
        )
        pmodes = probe_modes(cfg.infer.max_overlap, with_memory=retriever is not None)
        if len(pitems):
            result["probe"] = {
                "references": len(pitems),
                "documents": n_docs,
                "modes": evaluate_items(
                    model, pitems, sink=sink, modes=pmodes, retriever=retriever, batch_size=cfg.infer.eval.batch_size
                ),
            }
    return result


def memory_evidence(cfg, bank: Bank, tc: TrainConfig) -> dict:
    """Held-out loss of the warmup model, and of the continual model with and without memory."""
    warm = evaluate_checkpoint(cfg, bank, warmup_model_dir(bank, tc), tc, with_memory=False)
    cont = evaluate_checkpoint(cfg, bank, bank.trained_model("continual"), tc)
    m = cont["modes"]
    out = {
        "split": "heldout",
        "sequences": cont["sequences"],
        "tokens": cont["tokens"],
        "warmup_loss": warm["modes"]["none"]["loss"],
        "continual_loss_no_memory": m["none"]["loss"],
        "continual_loss_memory": m.get("memory", {}).get("loss"),
        "continual_loss_other_memory": m.get("memory, another sequence's (control)", {}).get("loss"),
        "paired": m.get("memory", {}).get("vs_none", {}),
        "paired_other": m.get("memory, another sequence's (control)", {}).get("vs_none", {}),
    }
    p = out["paired"]
    print(
        "evidence (held-out): "
        + ", ".join(f"{k} {v:.4f}" for k, v in out.items() if isinstance(v, float))
        + (
            f"; memory lowers the loss by {p['gain']:.4f} +- {p['stderr']:.4f} nats/token per sequence, "
            f"{p['helped']} of {p['of']} sequences"
            if p
            else ""
        ),
        flush=True,
    )
    return out
