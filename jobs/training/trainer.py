"""`m3 train --stage warmup|continual|control`: two-stage pretraining on DeepSpeed, run by Ray Train.

    m3 train -c configs/demo.yaml --stage warmup
    deepspeed --num_gpus 2 -m jobs.cli.train -c F --stage warmup       # or torchrun: same loop

warmup is plain language modeling; continual starts from the warmup model and gives every
64-token chunk the memories of its own neighbor and the previous window-1 chunks' neighbors,
encoded in the same step with the current weights (model/train_step.py). control is the
equal-compute control: the continual stage's steps, rate, schedule and sequences (in the same
order: the data order is a function of the seed and the step, not of memory) from the same warmup
model, without memory; its model is the headline's baseline, never served or encoded with
(jobs/models.py). Each worker reads its
own shard (pipelines/train_data.py). Everything lives in <bank>/training/<stage>/:
checkpoints/ (DeepSpeed's format, resumed from automatically), model/ (the latest exported
safetensors, model_hash and the training options in export.json), log.jsonl (one line a step).
A rerun after a kill continues from the last checkpoint and, with the same seed, repeats the
loss trajectory of an uninterrupted run: the data order is a function of the step, and the
model, optimizer and schedule states come back from the checkpoint.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import shutil
import time
from pathlib import Path

from jobs.config import ConfigError
from jobs.config.train import TrainConfig
from jobs.faults import maybe_crash, maybe_pause
from jobs.models import warmup_model_dir
from jobs.runtime import NODE_LOSS_RETRIES, node_lost
from jobs.training.codec import memory_codec
from jobs.training.log import LogFollower, open_log, plot_losses, progress_line, read_rows
from model.errors import M3Error
from model.files import WEIGHTS_FILE
from storage.bank import Bank, BankError
from storage.lock import writes_bank

STAGES = ("warmup", "continual", "control")
KEEP_CHECKPOINTS = 2


class TrainError(M3Error, RuntimeError):
    pass


def check_stage(cfg, bank: Bank, tc: TrainConfig, stage: str) -> None:
    """Fail before any work: unknown stage, missing inputs, sequences too long for the model."""
    if stage not in STAGES:
        raise ConfigError(f"--stage: expected one of {', '.join(STAGES)}, got {stage!r}")
    bank.require("train_sequences")
    if stage != "warmup":  # continual and its control start from the warmup model
        src = warmup_model_dir(bank, tc)
        if not (src / WEIGHTS_FILE).exists():
            raise BankError(
                f"{stage} training starts from the warmup model, but {src} holds no "
                f"{WEIGHTS_FILE}: run `m3 train --stage warmup` first"
            )
        _check_resume_start(bank, tc, src, stage)
        _check_tokenizer(bank, src)
    if tc.with_memory(stage):
        bank.require("neighbors")
        memory_codec(cfg, tc)  # refuses a codec training cannot pass memories through
        if tc.memory_schedule == "serving" and cfg.pair.per_chunk < cfg.model.mems_per_chunk:
            raise ConfigError(
                f"pair.per_chunk={cfg.pair.per_chunk}: train.memory_schedule 'serving' reads "
                f"model.mems_per_chunk={cfg.model.mems_per_chunk} references per chunk, as "
                f"inference does; set pair.per_chunk to {cfg.model.mems_per_chunk}"
            )
    if tc.max_tokens is not None and tc.max_tokens > cfg.model.max_seq_len:
        raise ConfigError(f"train.max_tokens={tc.max_tokens} exceeds model.max_seq_len={cfg.model.max_seq_len}")


def _check_tokenizer(bank: Bank, src: Path) -> None:
    """The model a stage starts from was made for the tokenizer the bank was cut with (a
    pretrained import and its own tokenizer, pipelines/tokenizer.py's check_bank_tokenizer)."""
    from model.config import ModelConfig
    from model.files import CONFIG_FILE
    from pipelines.tokenizer import check_bank_tokenizer
    from pipelines.tokenizer import load as load_tokenizer

    tok_rel = bank.metadata("refs").get("tokenizer_path") if bank.has("refs") else None
    if not tok_rel:  # sequences written without ingest (tests): no tokenizer to hold the model to
        return
    model = ModelConfig.from_dict(json.loads((src / CONFIG_FILE).read_text()))
    check_bank_tokenizer(load_tokenizer(bank.layout.path(tok_rel)), model, f"the model in {src}")


def absolute_paths(cfg, tc: TrainConfig):
    """The same config with the local paths training reads made absolute: Ray Train runs each
    worker in a directory of its own, where a relative path names nothing (bank.uri is
    absolute already, jobs/config/__init__.py). cfg.train is tc afterwards."""
    for name in ("warmup_checkpoint", "run_dir"):
        value = getattr(tc, name)
        if value and "://" not in value:
            tc = dataclasses.replace(tc, **{name: str(Path(value).resolve())})
    # a copy that carries tc as its train section; not dataclasses.replace, which would re-run
    # the loader's cross-section checks against a TrainConfig built in code (tests, benches)
    cfg = copy.copy(cfg)
    object.__setattr__(cfg, "train", tc)
    return cfg, tc


def trained_to_read(cfg, tc: TrainConfig, stage: str) -> dict:
    """What a checkpoint of this stage was trained to read (export.json, and the bank's readers
    compare it with the memories they serve)."""
    if not tc.with_memory(stage):
        return {"reads_memory": False}
    m = cfg.model
    return {
        "reads_memory": True,
        "schedule": tc.memory_schedule,  # top_k: tokens per head (all: ref_max_tokens)
        "top_k": min(m.mem_top_k, m.ref_max_tokens) if tc.sparsify_refs else m.ref_max_tokens,
        "codec": cfg.encode.codec if tc.through_codec else None,
        "refs_per_chunk": refs_per_chunk(cfg, tc, stage),
    }


def refs_per_chunk(cfg, tc: TrainConfig, stage: str) -> int:
    return cfg.model.mems_per_chunk if tc.with_memory(stage) and tc.memory_schedule == "serving" else 1


def _check_resume_start(bank: Bank, tc: TrainConfig, warmup_dir: Path, stage: str = "continual") -> None:
    """Continual (and control) checkpoints only resume on top of the warmup model they started
    from: a retrained warmup under an old run would mix two lineages in one model."""
    from model.checkpoint import saved_hash

    export = bank.trained_model(stage) / "export.json"
    if not export.exists():
        return
    started = json.loads(export.read_text()).get("init_model_hash")
    now = saved_hash(warmup_dir)
    if started is not None and started != now:
        raise TrainError(
            f"the {stage} checkpoints in {export.parent.parent} started from warmup model "
            f"{started[:12]}, but the warmup model is now {now[:12]}: remove that directory "
            f"to train the {stage} stage again"
        )


def _lock_as(cfg, stage: str, train: TrainConfig | None = None, launcher: str = "ray") -> str | None:
    """Training writes checkpoints and models under the bank: it holds the bank's write lock
    (storage/lock.py) in the driver, the Ray Train workers not; under a deepspeed or torchrun
    launcher, rank 0 holds it for the job."""
    return None if launcher != "ray" and int(os.environ.get("RANK", "0")) != 0 else f"{stage} training"


@writes_bank(_lock_as)
def run_train(cfg, stage: str, train: TrainConfig | None = None, launcher: str = "ray") -> dict:
    """Train one stage to its step count (resuming if checkpoints exist); return a summary."""
    tc = train if train is not None else getattr(cfg, "train", None) or TrainConfig()
    cfg, tc = absolute_paths(cfg, tc)
    bank = Bank.of(cfg)  # after absolute_paths: the workers resolve train.run_dir where they run
    check_stage(cfg, bank, tc, stage)
    args = {"cfg": cfg, "bank": bank, "train": tc, "stage": stage, "crash_at": os.environ.get("M3_CRASH_AT")}
    t0 = time.perf_counter()
    if launcher == "ray":
        _fit_with_ray(cfg, bank, tc, stage, args)
    else:  # one process of a launcher (deepspeed / torchrun): the rank comes from the env
        train_loop(args)
        if int(os.environ.get("RANK", "0")) != 0:
            return {"stage": stage, "rank": int(os.environ["RANK"])}
    summary = _summary(bank, stage, time.perf_counter() - t0)
    plot_losses({s: read_log(bank, s) for s in STAGES}, bank.training(stage).parent / "loss.png")
    if stage == "continual" and tc.continual_with_memory and tc.evidence:
        from jobs.training.evidence import memory_evidence

        summary["evidence"] = memory_evidence(cfg, bank, tc)
        (bank.training(stage) / "evidence.json").write_text(json.dumps(summary["evidence"], indent=2))
    return summary


def _fit_with_ray(cfg, bank: Bank, tc, stage, args) -> None:
    from jobs.runtime import init_ray, wait_for_state_api

    init_ray(cfg.ray)
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    if not cfg.ray.address and not cfg.ray.include_dashboard:
        raise ConfigError(
            "ray.include_dashboard: training needs the Ray dashboard (Ray Train reads its "
            "State API to tell a live run from a dead one); expected true, got false"
        )
    problem = wait_for_state_api()
    if problem:
        raise TrainError(
            f"Ray's State API (the dashboard's) did not answer within 2 minutes ({problem}); "
            f"Ray Train cannot run safely without it"
        )
    progress = LogFollower(bank.training(stage) / "log.jsonl", stage, tc)
    progress.start()
    try:
        for attempt in range(NODE_LOSS_RETRIES + 1):
            # max_failures=0: a worker that fails on its own (a bug, bad data) would fail again;
            # a lost node is retried below, from the last checkpoint, by the loop's own resume
            trainer = TorchTrainer(
                train_loop,
                train_loop_config={**args, "launcher": "ray"},
                scaling_config=ScalingConfig(
                    num_workers=tc.workers, use_gpu=_use_gpu(), resources_per_worker={"CPU": tc.cpus_per_worker}
                ),
                torch_config=TorchConfig(backend="nccl" if _use_gpu() else "gloo"),
                run_config=RunConfig(
                    name=f"m3-{stage}",
                    storage_path=str(bank.training(stage) / "ray"),
                    failure_config=FailureConfig(max_failures=0),
                ),
            )
            try:
                trainer.fit()
                break
            except Exception as e:  # Ray wraps the worker's error; keep its message, drop Ray's frames
                if attempt < NODE_LOSS_RETRIES and node_lost(e):
                    print(
                        f"train {stage}: a node of the cluster died under the run; resuming from the last "
                        f"checkpoint (retry {attempt + 1} of {NODE_LOSS_RETRIES})",
                        flush=True,
                    )
                    continue
                raise TrainError(f"{stage} training failed: {type(e).__name__}: {str(e)[-2000:]}") from None
    finally:
        progress.stop()


def _use_gpu() -> bool:
    import torch

    return torch.cuda.is_available()


def _rank_world(args) -> tuple[int, int]:
    if args.get("launcher") == "ray":
        import ray.train

        ctx = ray.train.get_context()
        return ctx.get_world_rank(), ctx.get_world_size()
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def _no_shm_comm_op() -> None:
    """DeepSpeed's TorchBackend JIT-compiles a shared-memory all-reduce op (tens of seconds on
    this machine, once per cache) that only its inference all-reduce uses; training reduces
    through torch.distributed, so skip building it."""
    import importlib

    # by module path: the attribute deepspeed.comm.torch is the torch package itself
    importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None


def ds_config(tc: TrainConfig, world: int) -> dict:
    return {
        "train_micro_batch_size_per_gpu": tc.micro_batch,
        "gradient_accumulation_steps": tc.grad_accum,
        "train_batch_size": tc.micro_batch * tc.grad_accum * world,
        "gradient_clipping": tc.grad_clip,
        "zero_optimization": {"stage": tc.zero_stage},
        "zero_allow_untested_optimizer": True,  # torch's AdamW: no CPU-Adam JIT build
        "bf16": {"enabled": tc.dtype == "bfloat16"},
        "steps_per_print": 10**9,
    }


def build_optimizer(model, tc: TrainConfig, stage: str):
    import torch

    from model.schedule import WSDConfig, lr_lambda

    decay = [p for p in model.parameters() if p.dim() >= 2]  # no weight decay on norm gains
    flat = [p for p in model.parameters() if p.dim() < 2]
    peak = tc.stage_lr(stage)
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": tc.weight_decay}, {"params": flat, "weight_decay": 0.0}],
        lr=peak,
        betas=(0.9, 0.95),
    )
    steps = tc.stage_steps(stage)
    wsd = WSDConfig(
        peak_lr=peak,
        warmup_steps=min(tc.lr_warmup_steps, steps - round(tc.decay_fraction * steps)),
        total_steps=steps,
        decay_fraction=tc.decay_fraction,
        min_lr_ratio=tc.min_lr_ratio,
    )
    # LambdaLR asks for the rate of update s (0-based) with s updates done, which the WSD ramp
    # puts at 0 for the first update; shift by one so update s + 1 trains at the ramp's value
    # at s + 1 and the last update lands on the floor.
    f = lr_lambda(wsd)
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: f(s + 1))


def train_loop(args: dict) -> None:
    """One rank's training: the same function under Ray Train, `deepspeed` and torchrun."""
    import torch

    cfg, bank, tc, stage = args["cfg"], args["bank"], args["train"], args["stage"]
    if args.get("crash_at"):
        os.environ["M3_CRASH_AT"] = args["crash_at"]
    torch.set_num_threads(tc.threads_per_worker)
    rank, world = _rank_world(args)
    import deepspeed

    _no_shm_comm_op()
    deepspeed.init_distributed(dist_backend="nccl" if _use_gpu() else "gloo")
    from model import Memory3, load_model
    from model.train_step import continual_memories, lm_loss
    from pipelines.train_data import ShardReader

    torch.manual_seed(tc.seed)
    model = load_model(warmup_model_dir(bank, tc)).train() if stage != "warmup" else Memory3(cfg.model)
    with_memory = tc.with_memory(stage)
    codec = memory_codec(cfg, tc) if with_memory else None
    opt, sched = build_optimizer(model, tc, stage)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, lr_scheduler=sched, config=ds_config(tc, world))
    sdir = bank.training(stage)
    ckdir = sdir / "checkpoints"
    start = 0
    if (ckdir / "latest").exists():
        _, client = engine.load_checkpoint(str(ckdir))
        start = client["step"]
    mcfg = engine.module.config
    reader = ShardReader(
        bank,
        rank=rank,
        world=world,
        seed=tc.seed,
        micro_batch=tc.micro_batch,
        heldout_fraction=tc.heldout_fraction,
        neighbors=with_memory,
        chunk_size=mcfg.mem_chunk_size,
        max_tokens=tc.max_tokens or mcfg.max_seq_len,
        pad_id=mcfg.pad_id,
        refs_per_chunk=refs_per_chunk(cfg, tc, stage),
    )
    batches = reader.iterate(start * tc.grad_accum * tc.micro_batch)
    log = open_log(sdir / "log.jsonl", start) if rank == 0 else None
    total = tc.stage_steps(stage)
    if rank == 0:
        print(
            f"train {stage}: steps {start}->{total}, {world} worker(s), ZeRO {tc.zero_stage}, "
            f"{tc.dtype}, {reader.batches_per_epoch * tc.micro_batch} sequences per shard",
            flush=True,
        )
    dev = engine.device
    for step in range(start, total):
        t0 = time.perf_counter()
        lr = engine.optimizer.param_groups[0]["lr"]
        stats = torch.zeros(4, dtype=torch.float64)  # loss sum, target tokens, hits, chunks
        for _ in range(tc.grad_accum):
            b = next(batches)
            tokens = b["tokens"].to(dev)
            mem = mask = None
            if with_memory:
                mem, mask = continual_memories(
                    engine,
                    b["ref_tokens"].to(dev),
                    b["ref_valid"].to(dev),
                    window=tc.window,
                    sparsify=tc.sparsify_refs,
                    grad_through_refs=tc.grad_through_refs,
                    schedule=tc.memory_schedule,
                    codec=codec,
                    unique=b["ref_unique"].to(dev),
                    slot=b["ref_slot"].to(dev),
                )
                stats[2] += b["ref_valid"][:, :, 0].sum()  # chunks with a reference
                stats[3] += b["ref_valid"][:, :, 0].numel()
            loss = lm_loss(engine, tokens, mem, mask)
            engine.backward(loss)
            engine.step()
            stats[0] += loss.item()
            stats[1] += (tokens[:, 1:] != mcfg.pad_id).sum().item()
        torch.distributed.all_reduce(stats)  # for the log only; the update already happened
        if rank == 0:
            dt = time.perf_counter() - t0
            row = {
                "step": step + 1,
                "loss": stats[0].item() / (tc.grad_accum * world),
                "lr": lr,
                "tokens_per_s": stats[1].item() / dt,
                "memory_hits": int(stats[2]),
                "chunks": int(stats[3]),
                "seconds": dt,
            }
            log.write(json.dumps(row) + "\n")
            log.flush()
            if args.get("launcher") != "ray" and ((step + 1) % tc.log_every == 0 or step + 1 == total):
                print(progress_line(stage, row, total), flush=True)  # under Ray the driver prints
        if (step + 1) % tc.checkpoint_every == 0 or step + 1 == total:
            save_checkpoint(engine, cfg, bank, tc, stage, step + 1, rank)
        maybe_crash("train", step + 1)
        maybe_pause("train", step + 1)  # the node-death test kills this worker's node here
    if log:
        log.close()


def save_checkpoint(engine, cfg, bank: Bank, tc: TrainConfig, stage: str, step: int, rank: int) -> None:
    """DeepSpeed checkpoint (all ranks), then rank 0 exports safetensors and prunes old tags.
    DeepSpeed moves `latest` only after a complete save, so a kill mid-save resumes earlier."""
    import torch.distributed as dist

    from model import save_model
    from model.checkpoint import saved_hash

    sdir = bank.training(stage)
    options = {
        "stage": stage,
        "step": step,
        "init_model_hash": _init_hash(bank, tc, stage),
        "sparsify_refs": tc.sparsify_refs,
        "grad_through_refs": tc.grad_through_refs,
        "window": tc.window,
        "seed": tc.seed,
        "memory": trained_to_read(cfg, tc, stage),
        "train": dataclasses.asdict(tc),
    }
    engine.save_checkpoint(
        str(sdir / "checkpoints"), tag=f"step{step:07d}", client_state={"step": step, "options": options}
    )
    dist.barrier()
    if rank != 0:
        return
    tmp = sdir / "model.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    save_model(engine.module, tmp)
    (tmp / "export.json").write_text(json.dumps({**options, "model_hash": saved_hash(tmp)}, indent=2))
    shutil.rmtree(sdir / "model", ignore_errors=True)
    tmp.rename(sdir / "model")
    tags = sorted(p for p in (sdir / "checkpoints").iterdir() if p.is_dir() and p.name.startswith("step"))
    for old in tags[:-KEEP_CHECKPOINTS]:
        shutil.rmtree(old, ignore_errors=True)


def _init_hash(bank: Bank, tc: TrainConfig, stage: str) -> str | None:
    """The model a stage started from (None for warmup: a seeded random init)."""
    from model.checkpoint import saved_hash

    return saved_hash(warmup_model_dir(bank, tc)) if stage != "warmup" else None


def read_log(bank: Bank, stage: str) -> list[dict]:
    return read_rows(bank.training(stage) / "log.jsonl")


def _summary(bank: Bank, stage: str, seconds: float) -> dict:
    rows = read_log(bank, stage)
    export = bank.trained_model(stage) / "export.json"
    info = json.loads(export.read_text()) if export.exists() else {}
    out = {
        "stage": stage,
        "steps": len(rows),
        "seconds": round(seconds, 1),
        "final_loss": rows[-1]["loss"] if rows else None,
        "model_hash": info.get("model_hash"),
        "model_dir": str(bank.trained_model(stage)),
    }
    print(
        f"train {stage}: {out['steps']} steps, final loss {out['final_loss']}, model "
        f"{(out['model_hash'] or '?')[:12]} in {out['model_dir']}",
        flush=True,
    )
    return out
