"""Small seeded models and inputs shared by the model tests."""

import torch

from model import Memory3, ModelConfig
from model.transformer import RMSNorm


def make_model(seed: int = 0, init_std: float = 0.2, **overrides) -> Memory3:
    """A tiny model with weights large enough that attention is far from uniform (so a wrong
    mask or position shows) and random norm gains (so a skipped norm weight shows)."""
    cfg = ModelConfig.from_preset("tiny", init_std=init_std, **overrides)
    torch.manual_seed(seed)
    model = Memory3(cfg)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, RMSNorm):
                module.weight.uniform_(0.5, 1.5)
    return model.eval()


def random_tokens(gen: torch.Generator, cfg: ModelConfig, *shape: int) -> torch.Tensor:
    """Ordinary tokens only: ids 0..3 are pad/bos/eos/ref_bos."""
    return torch.randint(4, cfg.vocab_size, shape, generator=gen)


def random_memories(gen: torch.Generator, cfg: ModelConfig, B: int, C: int, M: int, k: int, p_valid: float = 0.8):
    memories = torch.randn(B, C, M, cfg.n_mem_layers, 2, cfg.n_kv_heads, k, cfg.head_dim, generator=gen)
    mask = torch.rand(B, C, M, k, generator=gen) < p_valid
    return memories, mask
