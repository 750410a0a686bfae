"""GQA -> GLA (seed 000 §3.3.2): ``h_c`` latent heads, each compressing its own KV groups.

The machinery is MLA's (gqa_to_mla.py) with one joint BKV-PCA per latent head: latent head c
serves the query heads of KV groups ``c·h_kv/h_c … (c+1)·h_kv/h_c - 1`` and stores the top
``d_c`` components of their balanced ``[E_j/α_c; V_j]`` (``E_j``: group j's key after RoRoPE
took the shared RoPE key out). One RoPE key of ``d_R`` is shared by all heads, as in MLA.
"""

from __future__ import annotations

from kvslim.convert.gqa_to_mla import gqa_to_latent

__all__ = ["gqa_to_gla"]


def gqa_to_gla(model, moments, *, latent_heads: int, latent_dim: int, rope_dim: int = 64, freqfold: int | None = None,
               method: str = "transmla", balance: bool = True, progress: bool = True, stats: dict | None = None):
    """GQA -> GLA with ``latent_heads`` latents of ``latent_dim`` each (must divide h_kv)."""
    return gqa_to_latent(model, moments, latent_heads=latent_heads, latent_dim=latent_dim, rope_dim=rope_dim,
                         freqfold=freqfold, method=method, balance=balance, progress=progress, stats=stats)
