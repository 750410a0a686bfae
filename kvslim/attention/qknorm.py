"""QK-norm (Qwen3) in the tied-state variants: the cache row is computed from normalised keys.

A QK-norm source applies a per-head RMSNorm to queries and keys before RoPE
(``q_norm``/``k_norm``, one weight of ``d_h`` each). The key norm is a nonlinear function of
each token's key head, so no linear down-projection of ``x`` reproduces it: TransMLA's
``kv_a_proj`` (and a GTA ``kv_proj``) cannot. kvslim's cache row is computed at write time, so
the down-projection reads the source's normalised keys instead of ``x``:

    u = [k_norm(W_k[0] x) … k_norm(W_k[h_kv-1] x) ; W_v x]        (2·h_kv·d_h per token)

and the variant's own down-projection (GTA ``kv_proj`` + ``k_rope_proj``, MLA/GLA
``kv_a_proj_with_mqa``) maps ``u`` to the row. The RoPE key then comes from normalised keys,
and the latent / tied state is a fitted basis of ``[K_nope; V]`` in ``u`` (exact at full rank;
docs/convert.md). The query keeps the source's norm: ``q_h = q_head_proj[h] · q_norm(W_q[h] x)``,
where the per-head map carries what the converters fold into the query (RoRoPE's rotation, the
softmax-scale factor, GTA's key basis). Kernels see only q and rows, so they do not change; the
extra write-time cost is the source's own k/v projections for all ``h_kv`` heads.

Weights: ``q_proj`` (pre-norm, ``h_q·d_h``), ``q_norm``, ``q_head_proj`` (``[h_q, d_qk, d_h]``),
``k_proj``, ``k_norm``, ``v_proj`` (all ``h_kv`` heads on every tensor-parallel rank: the row
mixes heads).
"""

from __future__ import annotations

import torch
from torch import nn

from kvslim.layers import HeadLinear, RMSNorm, linears
from kvslim.spec import AttentionSpec

#: the projections of the layer input in a QK-norm tied module (one GEMM once fused)
FRONT = ("q_proj", "k_proj", "v_proj")


def add_front(module: nn.Module, spec: AttentionSpec, num_heads: int, qk_dim: int) -> int:
    """Give ``module`` the QK-norm front for ``num_heads`` local query heads of ``qk_dim``; returns
    the width of ``u`` (what the down-projection reads)."""
    D, d, h_kv = spec.hidden_size, spec.head_dim, spec.num_kv_heads
    module.q_proj = nn.Linear(D, num_heads * d, bias=spec.qkv_bias)
    module.q_norm = RMSNorm(d, spec.qk_norm_eps)
    module.q_head_proj = HeadLinear(num_heads, d, qk_dim)
    module.k_proj = nn.Linear(D, h_kv * d, bias=spec.qkv_bias)
    module.k_norm = RMSNorm(d, spec.qk_norm_eps)
    module.v_proj = nn.Linear(D, h_kv * d, bias=spec.qkv_bias)
    return 2 * h_kv * d


def front(module: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x ``[B, T, D]`` -> (queries ``[B, T, H, d_qk]`` before RoPE, ``u`` ``[B, T, 2·h_kv·d_h]``)."""
    B, T, _ = x.shape
    d = module.spec.head_dim
    q, k, v = linears(module, FRONT, x)
    q = module.q_head_proj(module.q_norm(q.view(B, T, -1, d)))
    k = module.k_norm(k.view(B, T, -1, d)).reshape(B, T, -1)
    return q, torch.cat([k, v], dim=-1)
