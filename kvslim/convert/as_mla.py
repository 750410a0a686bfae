"""MLA, GLA and GTA models re-expressed *exactly* as MLA models of a given layout (kvslim/serving.py).

:func:`as_mla` returns a kvslim MLA ``Transformer`` (``latent_norm=False``) that computes the
same function as its input, with the latent zero-padded to ``layout.latent_dim`` and the RoPE
key widened to ``layout.rope_dim``. Per layer, for query head h (latent head / group j):

* **latent rows** of ``kv_a_proj_with_mqa``: MLA's latent, GLA's ``h_c`` latents side by side,
  or GTA's ``h_kv`` tied states; then zero rows up to ``latent_dim``;
* **kv_b_proj** ``[W_UK[h]; W_UV[h]]`` over the whole latent: MLA's own; GLA's head block in
  the columns of latent head j (block-diagonal); GTA a 0/1 selection (``W_UK[h]`` picks the
  first ``d_h/2`` channels of state j, ``W_UV[h]`` all ``d_h`` of them);
* **RoPE**: a ``d_R`` key in rotate_half layout (dims m and m + d_R/2 rotate at frequency m)
  widened to ``d_R' = c·d_R`` puts frequency m in slot c·m, whose frequency
  ``θ^(-2cm/d_R')`` is the same; the other slots are zero rows in q and k;
* **softmax scale**: MLA divides scores by ``sqrt(d_nope + d_R')``; ``q_proj`` is multiplied by
  ``sqrt((d_nope + d_R') / d_qk)`` to keep the input's ``1/sqrt(d_qk)`` (GTA: ``d_qk = d_h``).

Biases ride along unchanged (zeros in the padded rows); what a DeepSeek checkpoint can hold
of them is decided by the exporter (deepseek.py).
"""

from __future__ import annotations

import math

import torch

from kvslim.convert.common import aug, new_model, set_linear
from kvslim.model import Transformer
from kvslim.serving import MLALayout
from kvslim.spec import AttentionSpec

__all__ = ["as_mla", "widen_rope_rows"]


def widen_rope_rows(w: torch.Tensor, width: int) -> torch.Tensor:
    """``[..., d_R, n]`` rotate_half RoPE rows -> ``[..., width, n]`` on every ``width/d_R``-th frequency."""
    d_r = w.shape[-2]
    if width == d_r:
        return w
    c = width // d_r
    out = w.new_zeros(*w.shape[:-2], width, w.shape[-1])
    m = torch.arange(d_r // 2)
    out[..., c * m, :] = w[..., m, :]
    out[..., c * m + width // 2, :] = w[..., m + d_r // 2, :]
    return out


def _heads(spec: AttentionSpec, layer_attn) -> dict:
    """Per layer, in float64 ``[W | b]`` form: q (nope, rope) per head, latent rows, rope-key rows, W_UK, W_UV."""
    h_q = spec.num_heads
    if spec.kind == "gta":
        d = spec.head_dim
        half, h_kv = d // 2, spec.num_kv_heads
        q = aug(layer_attn.q_proj).view(h_q, d, -1)
        eye = torch.eye(h_kv * d, dtype=torch.float64)
        g_q = h_q // h_kv
        w_uk = torch.stack([eye[(h // g_q) * d:(h // g_q) * d + half] for h in range(h_q)])
        w_uv = torch.stack([eye[(h // g_q) * d:(h // g_q + 1) * d] for h in range(h_q)])
        return dict(q_nope=q[:, :half], q_rope=q[:, half:], latent=aug(layer_attn.kv_proj),
                    k_rope=aug(layer_attn.k_rope_proj), w_uk=w_uk, w_uv=w_uv, d_qk=d)
    d_n, d_r, d_v, d_c, h_c = spec.head_dim, spec.rope_dim, spec.v_head_dim, spec.latent_dim, spec.num_latent_heads
    q = aug(layer_attn.q_proj).view(h_q, d_n + d_r, -1)
    kv_a = aug(layer_attn.kv_a_proj_with_mqa)
    kv_b = layer_attn.kv_b_proj.weight.detach().double().view(h_q, d_n + d_v, d_c)
    g = h_q // h_c
    w_uk = torch.zeros(h_q, d_n, h_c * d_c, dtype=torch.float64)
    w_uv = torch.zeros(h_q, d_v, h_c * d_c, dtype=torch.float64)
    for h in range(h_q):
        j = h // g
        w_uk[h, :, j * d_c:(j + 1) * d_c] = kv_b[h, :d_n]
        w_uv[h, :, j * d_c:(j + 1) * d_c] = kv_b[h, d_n:]
    return dict(q_nope=q[:, :d_n], q_rope=q[:, d_n:], latent=kv_a[: h_c * d_c], k_rope=kv_a[h_c * d_c:],
                w_uk=w_uk, w_uv=w_uv, d_qk=d_n + d_r)


@torch.no_grad()
def as_mla(model: Transformer, layout: MLALayout) -> Transformer:
    """``model`` (kind mla/gla/gta, no latent norm, no q-LoRA) as an exactly equivalent MLA model of ``layout``."""
    spec = model.spec
    if layout.source != spec:
        raise ValueError("layout was made for another attention spec (use mla_layout(model.spec, ...))")
    if spec.qk_norm:
        raise ValueError("a QK-norm model's row reads normalised key heads (attention/qknorm.py); an MLA "
                         "re-expression for DeepSeek cannot hold them")
    if spec.is_latent and (spec.latent_norm or spec.q_lora_rank):
        raise ValueError(f"an MLA/GLA model with {'a latent norm' if spec.latent_norm else 'q-LoRA'} cannot be "
                         "re-expressed: only converted models (latent_norm=False, no q_lora_rank) are supported")
    new_spec = AttentionSpec(kind="mla", hidden_size=spec.hidden_size, num_heads=spec.num_heads,
                             head_dim=layout.nope_dim, latent_dim=layout.latent_dim, rope_dim=layout.rope_dim,
                             v_head_dim=layout.v_head_dim, rope_theta=spec.rope_theta,
                             rope_scaling=spec.rope_scaling, latent_norm=False, qkv_bias=spec.qkv_bias)
    out = new_model(model, new_spec)
    pad = layout.latent_dim - layout.natural_latent
    for src, dst in zip(model.model.layers, out.model.layers):
        p = _heads(spec, src.self_attn)
        gamma = math.sqrt((layout.nope_dim + layout.rope_dim) / p["d_qk"])
        q = torch.cat([p["q_nope"], widen_rope_rows(p["q_rope"], layout.rope_dim)], 1) * gamma
        set_linear(dst.self_attn.q_proj, q.reshape(-1, q.shape[-1]))
        lat = p["latent"]
        kv_a = torch.cat([lat, lat.new_zeros(pad, lat.shape[1]), widen_rope_rows(p["k_rope"], layout.rope_dim)])
        set_linear(dst.self_attn.kv_a_proj_with_mqa, kv_a)
        w_uk, w_uv = (torch.cat([w, w.new_zeros(*w.shape[:2], pad)], 2) for w in (p["w_uk"], p["w_uv"]))
        kv_b = torch.cat([w_uk, w_uv], 1).reshape(-1, layout.latent_dim)
        dst.self_attn.kv_b_proj.weight.copy_(kv_b.to(dst.self_attn.kv_b_proj.weight.dtype))
        dst.self_attn.o_proj.weight.copy_(src.self_attn.o_proj.weight)
    return out
