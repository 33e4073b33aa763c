"""Where models live, and which one a command uses: one answer for every command that needs weights.

    1. the one named (encode.checkpoint, infer.checkpoint, --checkpoint), which must hold a model;
    2. the bank's newest trained model, where the trainer exported it (`Bank.trained_model`:
       <bank>/training/<stage>/model, or under train.run_dir): for encoding, continual, else
       train.warmup_checkpoint (a pretrained model `m3 import-model` wrote), else warmup
       (after training, the bank is re-encoded by the weights that will read it); for
       serving, continual only (a warmup model never learned to read memories);
    3. else, encoding starts from an untrained model, created once and reproducibly in
       <bank>/models/, and serving takes the model the memories were encoded with (their
       lineage): a bank is read by the weights that wrote it.

A reader pinned to an older published build (`m3 generate --build -1`) is served the model that
build's memories were written by, found by its hash (`model_of_build`), never today's weights
reading yesterday's memories.

The equal-compute control (<bank>/training/control/model: the continual stage's steps without
memory, jobs/training/trainer.py) is never picked by 2.: it is the baseline an evaluation loads
by name (`bank.trained_model(CONTROL)`), not weights that encode or read a bank.
"""

from __future__ import annotations

from pathlib import Path

from model.files import WEIGHTS_FILE
from storage.bank import Bank, BankError
from storage.layout import LayoutError


def warmup_model_dir(bank: Bank, tc) -> Path:
    """The model the continual stage starts from."""
    return Path(tc.warmup_checkpoint) if tc.warmup_checkpoint else bank.trained_model("warmup")


def _named(path: str, key: str) -> Path:
    p = Path(path)
    if not (p / WEIGHTS_FILE).exists():
        raise BankError(f"{key}: {p} holds no {WEIGHTS_FILE}")
    return p


# The equal-compute control's stage: its model never encodes or serves a bank.
CONTROL = "control"


def newest_trained(bank: Bank, stages: tuple[str, ...] = ("continual", "warmup")) -> Path | None:
    if CONTROL in stages:
        raise ValueError("the control model never encodes or serves a bank: load bank.trained_model(CONTROL) by name")
    for stage in stages:
        try:
            path = bank.trained_model(stage)
        except LayoutError:  # a bank on an object store without train.run_dir: nothing trained
            return None
        if (path / WEIGHTS_FILE).exists():
            return path
    return None


def _start_model(cfg) -> Path | None:
    """train.warmup_checkpoint, where it holds a model: the weights the continual stage will start
    from (a pretrained model `m3 import-model` wrote), which encode before any continual model."""
    path = cfg.train.warmup_checkpoint
    return Path(path) if path and (Path(path) / WEIGHTS_FILE).exists() else None


def model_for_encoding(cfg, bank: Bank) -> Path:
    if cfg.encode.checkpoint:
        return _named(cfg.encode.checkpoint, "encode.checkpoint")
    trained = newest_trained(bank, ("continual",)) or _start_model(cfg) or newest_trained(bank, ("warmup",))
    if trained is not None:
        return trained
    try:
        path = bank.layout.models() / f"init-{_init_name(cfg)}"
    except LayoutError:
        raise LayoutError(
            f"encode.checkpoint: the bank at {bank.uri} is on an object store, which keeps no "
            f"models (torch loads them from files); nothing is trained yet, so set "
            f"encode.checkpoint to a local model directory (or train with train.run_dir set)"
        ) from None
    if not (path / WEIGHTS_FILE).exists():
        import torch

        from model import Memory3, save_model

        torch.manual_seed(cfg.encode.seed)
        save_model(Memory3(cfg.model), path)
    return path


def _init_name(cfg) -> str:
    from jobs.config import config_hash

    return f"{config_hash(cfg.model)}-seed{cfg.encode.seed}"


def model_for_serving(cfg, bank: Bank, checkpoint: str | None = None, build: dict | None = None) -> Path:
    """build: the history entry of a published build the bank is pinned to (`--build`): its
    memories were written by one model, and that model reads them (see `model_of_build`)."""
    if checkpoint or cfg.infer.checkpoint:
        return _named(checkpoint or cfg.infer.checkpoint, "infer.checkpoint")
    if build is not None and bank.has("memories"):
        return model_of_build(bank, build)
    trained = newest_trained(bank, ("continual",))
    if trained is not None:
        return trained
    continual = bank.trained_model("continual")
    if not bank.has("memories"):
        raise BankError(
            f"no model to infer with: infer.checkpoint is null, {continual} does not exist "
            f"and the bank has no memories table to take the encoding model from (m3 encode)"
        )
    recorded = bank.metadata("memories").get("model_dir")
    if not recorded:
        raise BankError("the memories table records no model_dir in its lineage: set infer.checkpoint")
    # lineage paths are as the encode job saw them (maybe relative to its working directory)
    for path in (Path(recorded), bank.layout.models() / Path(recorded).name):
        if (path / WEIGHTS_FILE).exists():
            return path
    raise BankError(f"the memories were encoded with {recorded}, which holds no {WEIGHTS_FILE}: set infer.checkpoint")


def model_of_build(bank: Bank, build: dict) -> Path:
    """The model a pinned build names: a build pins table versions, not weights, but its
    memories record the hash (and directory) of the model that wrote them, and only that model
    can read them (MemoryStore refuses any other). An edit or a rollback of knowledge is a
    rebuild without retraining, so the continual model usually still is that model; after a
    retraining it may survive where the memories' lineage recorded it. Weights are never
    guessed: no model with that hash on disk is one error naming it."""
    from model.checkpoint import saved_hash

    meta = bank.metadata("memories")
    want, recorded = meta.get("model_hash"), meta.get("model_dir")
    candidates = [newest_trained(bank, ("continual",))]
    if recorded:
        candidates.append(Path(recorded))
        try:  # lineage paths are as the encode job saw them; a moved bank keeps its models inside
            candidates.append(bank.layout.models() / Path(recorded).name)
        except LayoutError:  # a bank on an object store keeps no models
            pass
    seen = []
    for path in candidates:
        if path is None or not (path / WEIGHTS_FILE).exists() or path in seen:
            continue
        seen.append(path)
        if want is None or saved_hash(path) == want:
            return path
    found = ", ".join(f"{p} ({saved_hash(p)[:12]})" for p in seen) or "none"
    raise BankError(
        f"build {build.get('build')}'s memories were written by model {str(want)[:12]} "
        f"({recorded}), which is not on disk any more (models found: {found}): set "
        f"infer.checkpoint to a copy of it"
    )
