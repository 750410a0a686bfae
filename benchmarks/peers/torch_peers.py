"""Torch peers: SDPA backends on contiguous K/V, and the naive absorbed MLA/GLA/GTA path."""

from __future__ import annotations

import torch

DT = torch.bfloat16


def sdpa_peers(p):
    """{name: fn} for torch SDPA backends on contiguous K/V (tied kinds: K materialised)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    rows = p.contiguous_rows()
    if p.tied:
        st = rows[..., : p.S * p.sd].view(p.B, p.L, p.S, p.sd)
        kr = rows[..., p.S * p.sd :][:, :, None, :].expand(p.B, p.L, p.S, p.rope)
        k = torch.cat([st[..., : p.nope], kr], -1).transpose(1, 2).contiguous()  # [B, S, L, dqk]
        v = st[..., : p.dv].transpose(1, 2).contiguous()
        n_kv = p.S
    else:
        kd = p.h_kv * p.d
        k = rows[..., :kd].view(p.B, p.L, p.h_kv, p.d).transpose(1, 2).contiguous()
        v = rows[..., kd:].view(p.B, p.L, p.h_kv, p.d).transpose(1, 2).contiguous()
        n_kv = p.h_kv
    del rows
    q = p.q.transpose(1, 2).contiguous()  # [B, h_q, q_len, d]
    g = p.h_q // n_kv
    out = {}
    if max(p.dqk, p.dv) > 256:
        return out, "head dim > 256: no fused SDPA backend"
    expanded = {}

    def get_expanded():
        if not expanded:
            expanded["k"] = k.repeat_interleave(g, 1)
            expanded["v"] = v.repeat_interleave(g, 1)
        return expanded["k"], expanded["v"]

    F = torch.nn.functional.scaled_dot_product_attention
    for name, be in (
        ("sdpa-cudnn", SDPBackend.CUDNN_ATTENTION),
        ("sdpa-flash", SDPBackend.FLASH_ATTENTION),
        ("sdpa-efficient", SDPBackend.EFFICIENT_ATTENTION),
    ):
        for mode in ("gqa", "expanded"):
            try:
                if mode == "gqa":
                    kk, vv, kw = k, v, dict(enable_gqa=g > 1)
                else:
                    if g == 1:
                        continue
                    kk, vv = get_expanded()
                    kw = {}

                def fn(kk=kk, vv=vv, kw=kw, be=be):
                    with sdpa_kernel(be):
                        return F(q, kk, vv, scale=p.scale, **kw)

                fn()
                torch.cuda.synchronize()
                out[f"{name}({mode})"] = fn
                break
            except Exception as e:  # backend refuses this shape / dtype / GQA
                err = f"{type(e).__name__}: {str(e).splitlines()[0][:80]}"
                out.setdefault("_errors", []).append(f"{name}({mode}) {err}")
    return out, None


def naive_absorbed(p):
    """Naive absorbed torch path: bf16 matmuls over the (latent) state, fp32 softmax."""
    rows = p.contiguous_rows()
    st = rows[..., : p.S * p.sd].view(p.B, p.L, p.S, p.sd).transpose(1, 2)  # [B, S, L, sd]
    kr = rows[..., p.S * p.sd :]  # [B, L, rope]
    g = p.h_q // p.S
    # q [B, q_len, h_q, dqk] -> [B, S, g*q_len, dqk]
    q = p.q.view(p.B, p.q_len, p.S, g, p.dqk).permute(0, 2, 1, 3, 4).reshape(p.B, p.S, p.q_len * g, p.dqk)
    qn, qr = q[..., : p.nope].contiguous(), q[..., p.nope :].contiguous()
    kn = st[..., : p.nope]
    vv = st[..., : p.dv]

    def fn():
        s = torch.matmul(qn, kn.transpose(-1, -2))
        s = s + torch.matmul(qr, kr[:, None].transpose(-1, -2))
        pr = torch.softmax(s.float() * p.scale, -1).to(DT)
        return torch.matmul(pr, vv)  # [B, S, q_len*g, dv]

    return fn
