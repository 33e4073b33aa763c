"""Lineage: save and load a model as safetensors + config JSON, and a stable model hash.

Every memory the model writes carries model_hash(model), so a bank is never read by a model
other than the one that wrote it. Loading never unpickles (no torch.load): a checkpoint from
an untrusted place cannot run code.
"""

import hashlib
import json
from pathlib import Path

import torch
from safetensors.torch import load_file, safe_open, save_file

from .config import ModelConfig
from .files import CONFIG_FILE, WEIGHTS_FILE
from .transformer import Memory3


def model_hash(model: Memory3) -> str:
    """sha256 hex of the config and of every weight's name, dtype, shape and bytes.

    Stable across processes and machines (no pickling, names sorted). A change of dtype
    changes the hash, because a bf16 copy writes different memories than its fp32 source.
    """
    h = hashlib.sha256()
    h.update(json.dumps(model.config.to_dict(), sort_keys=True).encode())
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().to("cpu").contiguous()
        h.update(f"\n{name}|{t.dtype}|{tuple(t.shape)}\n".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def save_model(model: Memory3, directory: str | Path) -> Path:
    """Write directory/model.safetensors (hash in its metadata) and directory/config.json."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {name: t.detach().to("cpu").contiguous() for name, t in model.state_dict().items()}
    save_file(tensors, directory / WEIGHTS_FILE, metadata={"model_hash": model_hash(model)})
    (directory / CONFIG_FILE).write_text(json.dumps(model.config.to_dict(), indent=2, sort_keys=True) + "\n")
    return directory


def saved_hash(directory: str | Path) -> str:
    """The hash recorded at save time, read without loading the weights."""
    with safe_open(Path(directory) / WEIGHTS_FILE, framework="pt") as f:
        return f.metadata()["model_hash"]


def load_model(
    directory: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None, verify: bool = True
) -> Memory3:
    """Rebuild a saved model. verify recomputes the hash and raises ValueError on a mismatch
    (corrupt or edited file). dtype converts after loading (and so changes the hash)."""
    directory = Path(directory)
    config = ModelConfig.from_dict(json.loads((directory / CONFIG_FILE).read_text()))
    with torch.device("meta"):  # no random init: every tensor comes from the file
        model = Memory3(config)
    state = load_file(directory / WEIGHTS_FILE, device=str(device))
    model.load_state_dict(state, strict=True, assign=True)
    if verify:
        expected, actual = saved_hash(directory), model_hash(model)
        if expected != actual:
            raise ValueError(f"{directory}: weights hash {actual} != recorded {expected}")
    if dtype is not None:
        model = model.to(dtype)
    return model.eval()


def memory_reading(path: str | Path) -> dict:
    """What a saved model was trained to read, from the export.json the trainer writes beside it
    ({"reads_memory": bool, "schedule", "top_k", "codec", ...}); {} when there is none (a model
    saved outside training). Older exports lack it: their continual stage read memories."""
    import json

    export = Path(path) / "export.json"
    if not export.exists():
        return {}
    info = json.loads(export.read_text())
    return info.get("memory") or ({"reads_memory": True} if info.get("stage") == "continual" else {})
