"""Multi-head Latent Attention (DeepSeek-V2) and Grouped Latent Attention (seed 000 §3.3.2).

MLA is GLA with one latent head, so one module serves both. Each token caches h_c
latents ``c_j`` of d_c plus one decoupled RoPE key of d_R:
row = ``[c_0 .. c_{h_c-1} | k_rope]``. Query head h belongs to latent head
``j = h // (h_q/h_c)`` and has its own up-projections (rows of ``kv_b_proj``):

    k_h = concat(W_UK[h] c_j, RoPE(k_rope))        v_h = W_UV[h] c_j

Two decode paths give the same result (tested):

* **naive**: up-project every cached latent to K/V and attend (``absorb = False``);
* **absorbed**: fold W_UK[h] into the query (``q_h <- [W_UK[h]^T q_nope, q_rope]``) and
  W_UV[h] into the output, so the tied-state kernel attends over the latents directly
  (S = h_c state heads, key = ``concat(c_j, k_rope)``, value = ``c_j``).

Weight names follow DeepSeek-V2/V3 in ``transformers`` (``q_proj`` or ``q_a_proj`` +
``q_a_layernorm`` + ``q_b_proj``, ``kv_a_proj_with_mqa``, ``kv_a_layernorm``,
``kv_b_proj``, ``o_proj``); for GLA ``kv_a_layernorm`` normalises each latent head on
its own. Under tensor parallelism GLA splits latent heads over ranks; MLA's single
latent is replicated on every rank (seed 000 Fig. 1); the RoPE key is replicated.

With ``spec.qk_norm`` (a converted QK-norm source, qknorm.py) ``kv_a_proj_with_mqa`` reads the
normalised source keys and values ``u`` instead of ``x``, and each query head is
``q_head_proj[h] q_norm(q_proj x)_h``; both decode paths are otherwise unchanged.
"""

from __future__ import annotations

import torch
from torch import nn

from kvslim.attention import qknorm
from kvslim.attention.base import AttentionBase, shard_rows, shard_state
from kvslim.kernels import decode_tied, prefill_tied
from kvslim.layers import RMSNorm, linears
from kvslim.rope import apply_rope


class LatentAttention(AttentionBase):
    fresh_prefill_sdpa = True

    def __init__(self, spec, *, tp_rank: int = 0, tp_size: int = 1, norm_eps: float = 1e-6):
        super().__init__(spec, tp_rank=tp_rank, tp_size=tp_size)
        if spec.kind not in ("mla", "gla"):
            raise ValueError(f"LatentAttention needs kind mla/gla, got {spec.kind}")
        loc, D = self.local, spec.hidden_size
        d_n, d_r, d_v, d_c = spec.head_dim, spec.rope_dim, spec.v_head_dim, spec.latent_dim
        H, S = loc.num_heads, loc.num_latent_heads
        if spec.qk_norm:
            D = qknorm.add_front(self, spec, H, d_n + d_r)  # the latent reads u, not x
        elif spec.q_lora_rank:
            self.q_a_proj = nn.Linear(D, spec.q_lora_rank, bias=spec.qkv_bias)
            self.q_a_layernorm = RMSNorm(spec.q_lora_rank, norm_eps)
            self.q_b_proj = nn.Linear(spec.q_lora_rank, H * (d_n + d_r), bias=False)
        else:
            self.q_proj = nn.Linear(D, H * (d_n + d_r), bias=spec.qkv_bias)
        self.kv_a_proj_with_mqa = nn.Linear(D, S * d_c + d_r, bias=spec.qkv_bias and not spec.qk_norm)
        self.kv_a_layernorm = RMSNorm(d_c, norm_eps) if spec.latent_norm else None
        if spec.latent_norm and S > 1:
            # one weight per latent head (stored flat, [S * d_c])
            self.kv_a_layernorm.weight = nn.Parameter(torch.ones(S * d_c))
        self.kv_b_proj = nn.Linear(d_c, H * (d_n + d_v), bias=False)
        self.o_proj = nn.Linear(H * d_v, spec.hidden_size, bias=False)
        self.absorb = True

    def _norm_latent(self, c):
        """c ``[B, T, S, d_c]`` -> normalised per latent head (if the spec asks)."""
        if self.kv_a_layernorm is None:
            return c
        n = self.kv_a_layernorm
        cf = c.float()
        cf = cf * torch.rsqrt(cf.pow(2).mean(-1, keepdim=True) + n.eps)
        return n.weight.view(-1, c.shape[-1]).to(c.dtype) * cf.to(c.dtype)

    def _w_ukv(self):
        """Per-head up-projections: W_UK ``[H, d_nope, d_c]``, W_UV ``[H, d_v, d_c]``."""
        s = self.spec
        w = self.kv_b_proj.weight.view(self.local.num_heads, s.head_dim + s.v_head_dim, s.latent_dim)
        return w[:, : s.head_dim], w[:, s.head_dim :]

    @property
    def FUSE(self) -> tuple[str, ...]:
        """The projections of the layer input (one GEMM once fused)."""
        if self.spec.qk_norm:
            return qknorm.FRONT
        return ("q_a_proj" if self.spec.q_lora_rank else "q_proj", "kv_a_proj_with_mqa")

    def _query(self, x):
        if self.spec.qk_norm:
            q, u = qknorm.front(self, x)
            return q, self.kv_a_proj_with_mqa(u)
        q, kv = linears(self, self.FUSE, x)
        if self.spec.q_lora_rank:
            q = self.q_b_proj(self.q_a_layernorm(q))
        return q, kv

    def project(self, x, cos, sin):
        B, T, _ = x.shape
        s, loc = self.spec, self.local
        d_n, d_r, d_c, S = s.head_dim, s.rope_dim, s.latent_dim, loc.num_latent_heads
        q, kv = self._query(x)
        q = q.reshape(B, T, loc.num_heads, d_n + d_r)
        q = torch.cat([q[..., :d_n], apply_rope(q[..., d_n:], cos, sin)], dim=-1)
        c = self._norm_latent(kv[..., : S * d_c].view(B, T, S, d_c)).reshape(B, T, S * d_c)
        k_rope = apply_rope(kv[..., S * d_c :], cos, sin)
        return q, torch.cat([c, k_rope], dim=-1)

    def expand(self, rows):
        B, L, _ = rows.shape
        s, loc = self.spec, self.local
        S, H, d_c = loc.num_latent_heads, loc.num_heads, s.latent_dim
        c = rows[..., : S * d_c].view(B, L, S, d_c).repeat_interleave(H // S, dim=2)  # [B, L, H, d_c]
        w_uk, w_uv = self._w_ukv()
        k_nope = torch.einsum("blhc,hnc->blhn", c, w_uk.to(c.dtype))
        v = torch.einsum("blhc,hvc->blhv", c, w_uv.to(c.dtype))
        rope = rows[..., S * d_c :][:, :, None, :].expand(B, L, H, s.rope_dim)
        return torch.cat([k_nope, rope], dim=-1), v

    def use_kernel_path(self) -> bool:
        return self.absorb

    def decode(self, q, cache, seq_lens):
        s, loc = self.spec, self.local
        w_uk, w_uv = self._w_ukv()
        q_lat = torch.einsum("bthn,hnc->bthc", q[..., : s.head_dim], w_uk.to(q.dtype))
        q_abs = torch.cat([q_lat, q[..., s.head_dim :]], dim=-1)
        qk, fmt = self.kernel_inputs(q_abs, cache)
        o_lat, _ = self.kernel_for(q, decode_tied, prefill_tied)(
            qk, cache.pool, cache.block_table, seq_lens,
            num_state_heads=loc.num_latent_heads, state_dim=s.latent_dim, nope_dim=s.latent_dim,
            rope_dim=s.rope_dim, v_dim=s.latent_dim, softmax_scale=s.softmax_scale, impl=self.impl, **fmt,
        )
        return torch.einsum("bthc,hvc->bthv", o_lat.to(q.dtype), w_uv.to(q.dtype))

    @staticmethod
    def shard_state_dict(sd: dict, spec, rank: int, size: int) -> dict:
        """Slice a full state dict to one rank: query heads and their up-projections split,
        latent heads split (GLA) or replicated (MLA), the RoPE key and q-LoRA replicated."""
        h_q, h_c, d_c = spec.num_heads, spec.num_latent_heads, spec.latent_dim
        out = shard_state(sd, rank, size, rows={"q_proj": h_q, "q_b_proj": h_q, "q_head_proj": h_q,
                                                   "kv_b_proj": h_q},
                          cols={"o_proj": h_q})
        for name, w in sd.items():
            if name.startswith("kv_a_proj_with_mqa."):  # [latents | rope key]: split the latents only
                lat = shard_rows(w[: h_c * d_c], h_c, rank, size)
                out[name] = torch.cat([lat, w[h_c * d_c :]], dim=0)
            elif name == "kv_a_layernorm.weight" and h_c > 1:  # one weight per latent head
                out[name] = shard_rows(w, h_c, rank, size)
        return out
