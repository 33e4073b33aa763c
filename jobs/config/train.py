"""The `train:` section of the pipeline YAML (both stages of pretraining, jobs/training/trainer.py).

Plain typed fields with range metadata, like jobs/config/__init__.py; __post_init__ checks them
(model.checked), so a TrainConfig built in code (tests, benches) and one loaded from YAML are
checked alike.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from model.checked import check_fields

DTYPES = ("float32", "bfloat16")


@dataclass(frozen=True)
class TrainConfig:
    # Ray Train workers (= DeepSpeed ranks); each reads its own shard of train_sequences.
    workers: int = field(default=2, metadata={"ge": 1})
    # CPUs Ray reserves per worker (fractional lets 2 workers share a 2-core machine with the
    # driver); torch intra-op threads per worker.
    cpus_per_worker: float = field(default=1.0, metadata={"gt": 0})
    threads_per_worker: int = field(default=1, metadata={"ge": 1})
    # ZeRO 1 (optimizer states sharded) or 2 (+ gradients). 3 would shard the parameters, which
    # the real-time reference encoder reads by hand: not supported.
    zero_stage: int = field(default=1, metadata={"ge": 1, "le": 2})
    micro_batch: int = field(default=2, metadata={"ge": 1})  # sequences per worker per micro-step
    grad_accum: int = field(default=1, metadata={"ge": 1})
    # Optimizer steps of each stage.
    warmup_stage_steps: int = field(default=200, metadata={"ge": 1})
    continual_stage_steps: int = field(default=100, metadata={"ge": 1})
    # Peak learning rate of the WSD schedule; the paper continues at a smaller rate.
    lr: float = field(default=2e-3, metadata={"gt": 0})
    lr_continual: float | None = field(default=None, metadata={"gt": 0})  # null = lr
    lr_warmup_steps: int = field(default=20, metadata={"ge": 0})  # linear ramp of the WSD
    decay_fraction: float = field(default=0.1, metadata={"ge": 0, "le": 1})  # last 10 % (paper)
    min_lr_ratio: float = field(default=0.1, metadata={"gt": 0, "le": 1})
    weight_decay: float = field(default=0.1, metadata={"ge": 0})
    grad_clip: float = field(default=1.0, metadata={"gt": 0})
    # fp16 is not supported on CPU by DeepSpeed; bf16 on GPU (and optionally CPU).
    dtype: str = field(default="float32", metadata={"choices": DTYPES})
    # Train on the first max_tokens of each sequence (null = all); must fit model.max_seq_len.
    max_tokens: int | None = field(default=None, metadata={"ge": 2})
    checkpoint_every: int = field(default=50, metadata={"ge": 1})
    seed: int = 0
    # What the memory stages read, recorded with every checkpoint (the paper leaves it open):
    # "serving": chunk c reads the mems_per_chunk references chunk c-1 retrieved, as `m3 generate`
    # and `m3 eval` do (needs pair.per_chunk = model.mems_per_chunk); "paper": each chunk reads the
    # best reference of its own chunk and of the previous window-1 chunks (a look-ahead: its own
    # text chose one of them).
    memory_schedule: str = field(default="serving", metadata={"choices": ("serving", "paper")})
    # Keep the model's mem_top_k tokens per layer and KV head, as the bank stores them, or every token.
    sparsify_refs: bool = True
    # Pass the real-time memories through the bank's codec (encode.codec; straight-through), so
    # the model learns to read what a fetch returns. Not for "vq" (its quantizer is trained on the
    # finished model's memories).
    through_codec: bool = True
    # Let gradients flow through the reference encoding (else it runs under no_grad).
    grad_through_refs: bool = True
    window: int = field(default=5, metadata={"ge": 1})  # "paper": own reference + previous 4 chunks'
    # Which stages read memories: the paper's recipe is warmup without, continual with.
    # warmup_with_memory = memory from scratch; continual_with_memory false = the control that
    # trains the continual stage on the same tokens without memory (the paper's Fig. 11).
    warmup_with_memory: bool = False
    continual_with_memory: bool = True
    # The equal-compute control (stage "control", `m3 train --stage control`; `m3 run` trains it
    # after continual unless false): from the same warmup model, continual_stage_steps steps at
    # the continual stage's rate and schedule over the same sequences in the same order, without
    # memory. The headline's baseline: what those steps give without memory (jobs/models.py
    # never serves or encodes with it).
    control: bool = True
    # Where the stages live: null = <bank>/training; another directory keeps a second recipe's
    # runs apart from the bank's own (bench/memory_gain.py trains several).
    run_dir: str | None = None
    log_every: int = field(default=10, metadata={"ge": 1})  # progress line every N steps
    # Sequences whose seq_id hashes below this fraction are held out: never trained on.
    heldout_fraction: float = field(default=0.05, metadata={"ge": 0, "lt": 1})
    eval_sequences: int = field(default=64, metadata={"ge": 1})
    # Held-out evidence (jobs/training/evidence.py) at the end of a continual stage that reads memories.
    evidence: bool = True
    # The warmup model the continual stage starts from; null = <bank>/training/warmup/model.
    warmup_checkpoint: str | None = None

    def __post_init__(self):
        check_fields(self)

    def with_memory(self, stage: str) -> bool:
        if stage == "control":  # the control's point: the continual stage's steps without memory
            return False
        return self.warmup_with_memory if stage == "warmup" else self.continual_with_memory

    def stage_steps(self, stage: str) -> int:
        return self.warmup_stage_steps if stage == "warmup" else self.continual_stage_steps

    def stage_lr(self, stage: str) -> float:
        return self.lr_continual if stage in ("continual", "control") and self.lr_continual else self.lr
