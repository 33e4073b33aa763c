"""Rotary position embedding, "rotate half" layout (GPT-NeoX / LLaMA)."""

import torch
from torch import Tensor


def rope_tables(positions: Tensor, head_dim: int, theta: float) -> tuple[Tensor, Tensor]:
    """cos and sin of position * theta^(-2i/head_dim), shape (T, head_dim/2), float32.

    Computed per call from the positions (a few thousand numbers) rather than kept as a buffer,
    so `model.to(torch.bfloat16)` cannot round the angles.
    """
    inv_freq = theta ** (-torch.arange(0, head_dim, 2, dtype=torch.float64, device=positions.device) / head_dim)
    angles = positions.to(torch.float64)[:, None] * inv_freq[None, :]
    return angles.cos().float(), angles.sin().float()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate each pair (x[..., i], x[..., i + D/2]) by its angle. x (B, H, T, D); cos/sin (T, D/2)."""
    x1, x2 = x.float().chunk(2, dim=-1)
    rotated = torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)
    return rotated.to(x.dtype)
