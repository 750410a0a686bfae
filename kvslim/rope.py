"""Rotary position embeddings: full (Llama), partial (GTA's half key), decoupled (MLA/GLA).

All variants use the ``rotate_half`` pairing of Hugging Face Llama (dimension ``i`` is
paired with ``i + rope_dim/2``), so checkpoints loaded from ``transformers`` match
exactly. What differs between variants is only *which* slice of a head is rotated; the
attention modules pass that slice here.

Scaling follows the Hugging Face ``rope_scaling`` dict: ``linear``, ``llama3`` (Llama-3.1)
and ``yarn`` (DeepSeek-V3, Qwen2.5 long context), computed as ``transformers`` does (tested
against its rotary embedding). YaRN also scales cos/sin by an attention factor
(:func:`rope_parameters`) and, with ``mscale_all_dim`` (DeepSeek), the softmax scale
(:func:`softmax_mscale`, applied by ``AttentionSpec.softmax_scale``).
"""

from __future__ import annotations

import math

import torch


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def _yarn(rope_dim: int, theta: float, scaling: dict) -> tuple[torch.Tensor, float]:
    """YaRN (Peng et al. 2023) exactly as ``transformers``' ``_compute_yarn_parameters``."""
    for key in ("factor", "original_max_position_embeddings"):
        if scaling.get(key) is None:
            raise ValueError(f"rope_scaling of type yarn needs {key!r}")
    factor, orig = float(scaling["factor"]), float(scaling["original_max_position_embeddings"])
    attention = scaling.get("attention_factor")
    mscale, mscale_all = scaling.get("mscale"), scaling.get("mscale_all_dim")
    if attention is None:
        attention = (_yarn_mscale(factor, mscale) / _yarn_mscale(factor, mscale_all) if mscale and mscale_all
                     else _yarn_mscale(factor))
    beta_fast, beta_slow = scaling.get("beta_fast") or 32, scaling.get("beta_slow") or 1

    def correction_dim(rotations):
        return rope_dim * math.log(orig / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if scaling.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, rope_dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(rope_dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    pos_freqs = theta ** (torch.arange(0, rope_dim, 2, dtype=torch.float32) / rope_dim)
    extrapolation = 1 - ramp
    inv = (1.0 / (factor * pos_freqs)) * (1 - extrapolation) + (1.0 / pos_freqs) * extrapolation
    return inv, float(attention)


def softmax_mscale(scaling: dict | None) -> float:
    """Multiplier of the softmax scale under YaRN with ``mscale_all_dim`` (DeepSeek), else 1."""
    if not scaling or _rope_type(scaling) == "default" or not scaling.get("mscale_all_dim"):
        return 1.0
    m = _yarn_mscale(float(scaling["factor"]), float(scaling["mscale_all_dim"]))
    return m * m


def _rope_type(scaling: dict | None) -> str:
    return (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))


def rope_parameters(rope_dim: int, theta: float, scaling: dict | None = None) -> tuple[torch.Tensor, float]:
    """``([rope_dim/2]`` fp32 inverse frequencies, cos/sin attention factor) after optional scaling."""
    if rope_dim % 2:
        raise ValueError(f"rope_dim must be even, got {rope_dim}")
    if _rope_type(scaling) == "yarn":
        return _yarn(rope_dim, theta, scaling)
    return inv_frequencies(rope_dim, theta, scaling), 1.0


def inv_frequencies(rope_dim: int, theta: float, scaling: dict | None = None) -> torch.Tensor:
    """``[rope_dim/2]`` fp32 inverse frequencies, after optional scaling."""
    if rope_dim % 2:
        raise ValueError(f"rope_dim must be even, got {rope_dim}")
    rtype = _rope_type(scaling)
    if rtype == "yarn":
        return _yarn(rope_dim, theta, scaling)[0]
    inv = 1.0 / (theta ** (torch.arange(0, rope_dim, 2, dtype=torch.float64) / rope_dim))
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
        raise ValueError(f"rope_scaling type {rtype!r} is not supported (supported: default, linear, llama3, yarn)")
    return inv.float()


class Rotary(torch.nn.Module):
    """cos/sin tables for one rope width; ``forward(positions)`` -> ``(cos, sin)``.

    ``positions`` is ``[B, T]`` (long); outputs are ``[B, T, rope_dim]`` in fp32. With ``repeat`` > 1
    (``AttentionSpec.rope_repeat``) the ``rope_dim/2`` slots take the frequencies of a ``rope_dim/repeat``
    key, each used by ``repeat`` adjacent slots (slot s has frequency ``s // repeat``).
    """

    def __init__(self, rope_dim: int, theta: float, scaling: dict | None = None, repeat: int = 1):
        super().__init__()
        if repeat < 1 or rope_dim % (2 * repeat):
            raise ValueError(f"rope_dim={rope_dim} must be a multiple of 2 * repeat={2 * repeat}")
        self.rope_dim, self.theta, self.scaling, self.repeat = rope_dim, theta, scaling, repeat
        inv, self.attention_factor = self._tables()
        self.register_buffer("inv_freq", inv, persistent=False)

    def _tables(self) -> tuple[torch.Tensor, float]:
        inv, factor = rope_parameters(self.rope_dim // self.repeat, self.theta, self.scaling)
        return inv.repeat_interleave(self.repeat), factor

    def reset_tables(self) -> None:
        """Recompute the (non-persistent) frequency table, e.g. after building on the meta device."""
        self.inv_freq = self._tables()[0]

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = positions.float()[..., None] * self.inv_freq  # [B, T, rope_dim/2]
        emb = torch.cat([freqs, freqs], dim=-1)
        if self.attention_factor != 1.0:
            return emb.cos() * self.attention_factor, emb.sin() * self.attention_factor
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
