"""Grouped-Tied Attention (seed 000 §3.3.1).

Each of the h_kv groups caches one tied state ``KV`` of d_h; one extra single-head key
``k_rope`` of d_h/2 gets RoPE and is shared by all heads. For query head h in group j:

    key   = concat(KV_j[:d_h/2], RoPE(k_rope))      value = KV_j (all d_h)

The query's first half meets the un-rotated half of the state, its second half is
rotated and meets the shared RoPE key. Cache row: ``[KV (h_kv*d_h) | k_rope (d_h/2)]``,
i.e. ``h_kv*d_h + d_h/2`` elements per token: half of GQA's, plus d_h/2.

Under tensor parallelism the groups are split over ranks and the RoPE key is
replicated (as in the paper's TP=2 figure: GTA-4 -> 2*128 + 64 per device).

With ``spec.qk_norm`` (a converted QK-norm source, qknorm.py) ``kv_proj`` and ``k_rope_proj`` read
the normalised source keys and values ``u`` instead of ``x``, and queries pass ``q_norm`` and a
per-head map.
"""

from __future__ import annotations

import torch
from torch import nn

from kvslim.attention import qknorm
from kvslim.attention.base import AttentionBase, shard_state
from kvslim.kernels import decode_tied, prefill_tied
from kvslim.layers import linears
from kvslim.rope import apply_rope


class GroupedTiedAttention(AttentionBase):
    ROW = ("kv_proj", "k_rope_proj")

    def __init__(self, spec, *, tp_rank: int = 0, tp_size: int = 1):
        super().__init__(spec, tp_rank=tp_rank, tp_size=tp_size)
        if spec.kind != "gta":
            raise ValueError(f"GroupedTiedAttention needs kind gta, got {spec.kind}")
        loc, D, d = self.local, spec.hidden_size, spec.head_dim
        if spec.qk_norm:
            D = qknorm.add_front(self, spec, loc.num_heads, d)  # the row reads u, not x
        else:
            self.q_proj = nn.Linear(D, loc.num_heads * d, bias=spec.qkv_bias)
        bias = spec.qkv_bias and not spec.qk_norm
        self.kv_proj = nn.Linear(D, loc.num_kv_heads * d, bias=bias)
        self.k_rope_proj = nn.Linear(D, d // 2, bias=bias)
        self.o_proj = nn.Linear(loc.num_heads * d, spec.hidden_size, bias=False)

    @property
    def FUSE(self) -> tuple[str, ...]:
        """The projections of the layer input (one GEMM once fused)."""
        return qknorm.FRONT if self.spec.qk_norm else ("q_proj",) + self.ROW

    def project(self, x, cos, sin):
        B, T, _ = x.shape
        loc, d = self.local, self.spec.head_dim
        half = d // 2
        if self.spec.qk_norm:
            q, u = qknorm.front(self, x)
            state, k_rope = linears(self, self.ROW, u)
        else:
            q, state, k_rope = linears(self, self.FUSE, x)
            q = q.view(B, T, loc.num_heads, d)
        q = torch.cat([q[..., :half], apply_rope(q[..., half:], cos, sin)], dim=-1)
        rows = torch.cat([state, apply_rope(k_rope, cos, sin)], dim=-1)  # [B, T, h*d + d/2]
        return q, rows

    def expand(self, rows):
        B, L, _ = rows.shape
        h, d = self.local.num_kv_heads, self.spec.head_dim
        state = rows[..., : h * d].view(B, L, h, d)
        rope = rows[..., h * d :][:, :, None, :].expand(B, L, h, d // 2)
        k = torch.cat([state[..., : d // 2], rope], dim=-1)
        return k, state

    def decode(self, q, cache, seq_lens):
        d = self.spec.head_dim
        qk, fmt = self.kernel_inputs(q, cache)
        o, _ = self.kernel_for(q, decode_tied, prefill_tied)(
            qk, cache.pool, cache.block_table, seq_lens,
            num_state_heads=self.local.num_kv_heads, state_dim=d, nope_dim=d // 2,
            rope_dim=d // 2, v_dim=d, softmax_scale=self.spec.softmax_scale, impl=self.impl, **fmt,
        )
        return o.to(q.dtype)

    @staticmethod
    def shard_state_dict(sd: dict, spec, rank: int, size: int) -> dict:
        """Slice a full state dict to one rank (the single RoPE key projection is replicated)."""
        h_q, h_kv = spec.num_heads, spec.num_kv_heads
        return shard_state(sd, rank, size, rows={"q_proj": h_q, "q_head_proj": h_q, "kv_proj": h_kv},
                           cols={"o_proj": h_q})
