"""Rotary position embeddings: full (Llama), partial (GTA's half key), decoupled (MLA/GLA).

All variants use the ``rotate_half`` pairing of Hugging Face Llama (dimension ``i`` is
paired with ``i + rope_dim/2``), so checkpoints loaded from ``transformers`` match
exactly. What differs between variants is only *which* slice of a head is rotated; the
attention modules pass that slice here.

Scaling follows the Hugging Face ``rope_scaling`` dict: ``linear`` and ``llama3``
(Llama-3.1) are supported; ``yarn`` (DeepSeek) is refused with a clear error rather
than computed approximately.
"""

from __future__ import annotations

import math

import torch


def inv_frequencies(rope_dim: int, theta: float, scaling: dict | None = None) -> torch.Tensor:
    """``[rope_dim/2]`` fp32 inverse frequencies, after optional scaling."""
    if rope_dim % 2:
        raise ValueError(f"rope_dim must be even, got {rope_dim}")
    inv = 1.0 / (theta ** (torch.arange(0, rope_dim, 2, dtype=torch.float64) / rope_dim))
    rtype = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))
    if rtype == "default":
        pass
    elif rtype == "linear":
        inv = inv / float(scaling["factor"])
    elif rtype == "llama3":
        factor = float(scaling["factor"])
        low = float(scaling.get("low_freq_factor", 1.0))
        high = float(scaling.get("high_freq_factor", 4.0))
        old_ctx = float(scaling.get("original_max_position_embeddings", 8192))
        low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
        wavelen = 2 * math.pi / inv
        scaled = torch.where(wavelen > low_wavelen, inv / factor, inv)
        smooth = (old_ctx / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        inv = torch.where(medium, smoothed, scaled)
    else:
        raise ValueError(f"rope_scaling type {rtype!r} is not supported (supported: default, linear, llama3)")
    return inv.float()


class Rotary(torch.nn.Module):
    """cos/sin tables for one rope width; ``forward(positions)`` -> ``(cos, sin)``.

    ``positions`` is ``[B, T]`` (long); outputs are ``[B, T, rope_dim]`` in fp32.
    """

    def __init__(self, rope_dim: int, theta: float, scaling: dict | None = None):
        super().__init__()
        self.rope_dim = rope_dim
        self.register_buffer("inv_freq", inv_frequencies(rope_dim, theta, scaling), persistent=False)

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = positions.float()[..., None] * self.inv_freq  # [B, T, rope_dim/2]
        emb = torch.cat([freqs, freqs], dim=-1)
        return emb.cos(), emb.sin()


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x [B, T, H, rope_dim]`` (or ``[B, T, rope_dim]``) by ``cos/sin [B, T, rope_dim]``."""
    if x.shape[-1] == 0:
        return x
    if x.dim() == 4:
        cos, sin = cos[:, :, None, :], sin[:, :, None, :]
    out = x.float() * cos + rotate_half(x.float()) * sin
    return out.to(x.dtype)
