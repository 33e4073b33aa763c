"""Rotary position embedding, "rotate half" layout (GPT-NeoX / LLaMA)."""

import math

import torch
from torch import Tensor


def rope_tables(
    positions: Tensor, head_dim: int, theta: float, llama3: tuple[float, float, float, int] | None = None
) -> tuple[Tensor, Tensor]:
    """cos and sin of position * theta^(-2i/head_dim), shape (T, head_dim/2), float32.

    Computed per call from the positions (a few thousand numbers) rather than kept as a buffer,
    so `model.to(torch.bfloat16)` cannot round the angles. llama3: (factor, low_freq_factor,
    high_freq_factor, original_max_len) of Llama 3.1's RoPE scaling, see llama3_inv_freq.
    """
    inv_freq = theta ** (-torch.arange(0, head_dim, 2, dtype=torch.float64, device=positions.device) / head_dim)
    if llama3 is not None:
        inv_freq = llama3_inv_freq(inv_freq, *llama3)
    angles = positions.to(torch.float64)[:, None] * inv_freq[None, :]
    return angles.cos().float(), angles.sin().float()


def llama3_inv_freq(inv_freq: Tensor, factor: float, low: float, high: float, original_max_len: int) -> Tensor:
    """Llama 3.1's scaling, as transformers' `_compute_llama3_parameters`: wavelengths longer than
    original_max_len / low are stretched by factor, shorter than original_max_len / high kept,
    and the band between interpolated (the checkpoint was trained with these frequencies)."""
    wavelen = 2 * math.pi / inv_freq
    low_wavelen, high_wavelen = original_max_len / low, original_max_len / high
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (original_max_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(medium, smoothed, scaled)


def rope_for(cfg, positions: Tensor) -> tuple[Tensor, Tensor]:
    """rope_tables with a model config's head_dim, base and scaling."""
    llama3 = None
    if cfg.rope_scaling == "llama3":
        llama3 = (cfg.rope_factor, cfg.rope_low_freq_factor, cfg.rope_high_freq_factor, cfg.rope_original_max_len)
    return rope_tables(positions, cfg.head_dim, cfg.rope_theta, llama3)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate each pair (x[..., i], x[..., i + D/2]) by its angle. x (B, H, T, D); cos/sin (T, D/2)."""
    x1, x2 = x.float().chunk(2, dim=-1)
    rotated = torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)
    return rotated.to(x.dtype)
