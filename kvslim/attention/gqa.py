"""MHA / MQA / GQA (seed 001): separate K and V for h_kv heads, g_q query heads per group.

Weights use Hugging Face Llama names (``q_proj, k_proj, v_proj, o_proj``) so Llama /
Mistral / Qwen2 checkpoints load without renaming. The cache row is ``[K | V]`` with
RoPE applied to the first ``rope_dim`` dims of each key head (full RoPE by default). With
``spec.qk_norm`` (Qwen3) each query and key head is RMS-normalised (``q_norm``, ``k_norm``) before RoPE.
"""

from __future__ import annotations

import torch
from torch import nn

from kvslim.attention.base import AttentionBase, shard_state
from kvslim.kernels import decode_separate, prefill_separate
from kvslim.layers import RMSNorm, linears
from kvslim.rope import apply_rope


class GroupedQueryAttention(AttentionBase):
    FUSE = ("q_proj", "k_proj", "v_proj")

    def __init__(self, spec, *, tp_rank: int = 0, tp_size: int = 1):
        super().__init__(spec, tp_rank=tp_rank, tp_size=tp_size)
        if spec.kind not in ("mha", "mqa", "gqa"):
            raise ValueError(f"GroupedQueryAttention needs kind mha/mqa/gqa, got {spec.kind}")
        loc, D, d = self.local, spec.hidden_size, spec.head_dim
        self.q_proj = nn.Linear(D, loc.num_heads * d, bias=spec.qkv_bias)
        self.k_proj = nn.Linear(D, loc.num_kv_heads * d, bias=spec.qkv_bias)
        self.v_proj = nn.Linear(D, loc.num_kv_heads * d, bias=spec.qkv_bias)
        self.o_proj = nn.Linear(loc.num_heads * d, D, bias=False)
        if spec.qk_norm:
            self.q_norm = RMSNorm(d, spec.qk_norm_eps)
            self.k_norm = RMSNorm(d, spec.qk_norm_eps)

    def _rope(self, t, cos, sin):
        r = self.spec.rope_dim
        if cos is None or r == 0:
            return t
        return torch.cat([apply_rope(t[..., :r], cos, sin), t[..., r:]], dim=-1)

    def project(self, x, cos, sin):
        B, T, _ = x.shape
        loc, d = self.local, self.spec.head_dim
        q, k, v = linears(self, self.FUSE, x)
        q, k = q.view(B, T, loc.num_heads, d), k.view(B, T, loc.num_kv_heads, d)
        if self.spec.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = self._rope(q, cos, sin), self._rope(k, cos, sin)
        rows = torch.cat([k.reshape(B, T, -1), v], dim=-1)
        return q, rows

    def expand(self, rows):
        B, L, _ = rows.shape
        h, d = self.local.num_kv_heads, self.spec.head_dim
        k = rows[..., : h * d].view(B, L, h, d)
        v = rows[..., h * d : 2 * h * d].view(B, L, h, d)
        return k, v

    def decode(self, q, cache, seq_lens):
        qk, fmt = self.kernel_inputs(q, cache)
        o, _ = self.kernel_for(q, decode_separate, prefill_separate)(
            qk, cache.pool, cache.block_table, seq_lens,
            num_kv_heads=self.local.num_kv_heads, head_dim=self.spec.head_dim,
            softmax_scale=self.spec.softmax_scale, impl=self.impl, **fmt,
        )
        return o.to(q.dtype)

    @staticmethod
    def shard_state_dict(sd: dict, spec, rank: int, size: int) -> dict:
        """Slice a full (unsharded) state dict to the weights of one rank."""
        h_q, h_kv = spec.num_heads, spec.num_kv_heads
        return shard_state(sd, rank, size, rows={"q_proj": h_q, "k_proj": h_kv, "v_proj": h_kv},
                           cols={"o_proj": h_q})
