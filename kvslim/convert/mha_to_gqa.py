"""MHA -> GQA / MQA by mean-pooling K and V heads (GQA paper, Ainslie et al. 2023, §2.1).

The ``h_kv`` source KV heads are split into ``h_kv'`` contiguous groups (``h_kv'`` divides
``h_kv``); each new head's K and V projections (and biases) are the mean of its group's.
RoPE is linear and identical for all heads, so pooling the pre-RoPE projections equals
pooling the rotated keys. Query heads keep their order: query head h (old group
``h // (h_q/h_kv)``) reads new group ``h // (h_q/h_kv')``, which contains its old head.
Queries and ``o_proj`` are unchanged; ``h_kv' = h_kv`` is the identity (tested). The paper
then uptrains for ~5% of pre-training compute to recover quality. A QK-norm source (Qwen3) keeps its
norms; pooling the pre-norm projections is then not pooling the normalised keys (only exact for
identical heads).
"""

from __future__ import annotations

import torch

from kvslim.convert.common import aug, check_grouped_source, new_model, qk_norm_fields, set_linear
from kvslim.spec import AttentionSpec

__all__ = ["check_gqa_target", "mha_to_gqa"]


def check_gqa_target(spec: AttentionSpec, num_kv_heads) -> None:
    """Raise ValueError naming the bad field if ``spec`` cannot be mean-pooled to ``num_kv_heads``."""
    if num_kv_heads is None:
        raise ValueError("--to gqa needs --kv-heads (num_kv_heads)")
    if not isinstance(num_kv_heads, int) or isinstance(num_kv_heads, bool) or num_kv_heads < 1:
        raise ValueError(f"num_kv_heads must be a positive int, got {num_kv_heads!r}")
    if spec.num_kv_heads % num_kv_heads:
        raise ValueError(
            f"num_kv_heads={num_kv_heads} must divide the source's {spec.num_kv_heads} KV heads "
            "(mean-pooling merges whole heads)"
        )


@torch.no_grad()
def mha_to_gqa(model, *, num_kv_heads: int):
    """Return a copy of ``model`` (kind mha/mqa/gqa) with ``num_kv_heads`` mean-pooled KV heads."""
    spec = check_grouped_source(model)
    check_gqa_target(spec, num_kv_heads)
    h_q, h_kv, d = spec.num_heads, spec.num_kv_heads, spec.head_dim
    kind = "mha" if num_kv_heads == h_q else ("mqa" if num_kv_heads == 1 else "gqa")
    new_spec = AttentionSpec(kind=kind, hidden_size=spec.hidden_size, num_heads=h_q, head_dim=d,
                             num_kv_heads=num_kv_heads, rope_dim=spec.rope_dim, rope_theta=spec.rope_theta,
                             rope_scaling=spec.rope_scaling, qkv_bias=spec.qkv_bias, **qk_norm_fields(spec))
    out = new_model(model, new_spec)
    per = h_kv // num_kv_heads
    for src, dst in zip(model.model.layers, out.model.layers):
        a, b = src.self_attn, dst.self_attn
        for name in ("k_proj", "v_proj"):
            W = aug(getattr(a, name)).view(num_kv_heads, per, d, -1).mean(1).reshape(num_kv_heads * d, -1)
            set_linear(getattr(b, name), W)
        for name in ("q_proj", "q_norm", "k_norm") if spec.qk_norm else ("q_proj",):
            getattr(b, name).load_state_dict(getattr(a, name).state_dict())
        b.o_proj.load_state_dict(a.o_proj.state_dict())
    return out
