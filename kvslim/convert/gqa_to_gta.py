"""GQA -> GTA (seed 000 §3.3.1): one tied state per group, one shared half-width RoPE key.

GTA caches, per group j, a state ``S_j`` of ``d_h``; a query head of group j scores against
``concat(S_j[:d_h/2], RoPE(k_rope))`` and reads ``S_j`` (all ``d_h``) as its value. The
design of the conversion (beyond TransMLA; docs/convert.md):

1. RoRoPE with ``d_R = d_h/2`` over all groups gives the shared RoPE key. Its frequencies
   ``θ^(-4m/d_h)`` are the source's even ones (c = 2 for a full-RoPE source): each FreqFold
   group of ``f`` (a multiple of 2) adjacent frequencies keeps ``f/2`` components.
2. Group j's NoPE key is ``E_j = R_{nope,j}ᵀ R_nope W_k`` (as for MLA), its value ``W_v[j]``.
3. The state is ``S_j = [s1; s2]``: ``s1`` (``d_h/2``, the key half) = top principal components
   of the balanced ``[E_j/α; V_j]`` (BKV-PCA at rank d_h/2, ``state="joint"``) or of ``E_j``
   alone (``state="key"``); ``s2`` (``d_h/2``) = top components of what of ``V_j`` ``s1``
   does not explain (least-squares residual).
4. Queries: NoPE half ``K1ᵀ q_h`` with ``E_j ≈ K1 s1`` (least squares), RoPE half
   ``R_{rope,j} q_h``; values ``V_j ≈ L_j S_j`` (least squares), ``L_j`` is folded into the
   ``o_proj`` columns of the group's heads. Softmax scale ``1/sqrt(d_h)`` is unchanged.

Exact (to float error) when the shared RoPE key captures every rotary component (MQA, or
rank-1 heads per frequency with only target frequencies) and, per group, ``E_j`` spans at
most ``d_h/2`` dims and ``[E_j; V_j]`` at most ``d_h`` (``state="key"``; tested).

A QK-norm source (Qwen3) is fit the same way on its normalised keys (common.py ``layer_view``): the
state and RoPE key read ``u = [k̂; v]`` and the query maps go to ``q_head_proj`` (attention/qknorm.py).
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from kvslim.convert.common import (
    FITS,
    balanced_kv,
    check_grouped_source,
    layer_view,
    lstsq_map,
    metric_basis,
    new_model,
    output_metric,
    qk_norm_fields,
    set_linear,
    set_queries,
    top_eigvecs,
)
from kvslim.convert.rorope import check_freqfold, collapse_factor, effective_keys, rorope_rotation
from kvslim.spec import AttentionSpec

__all__ = ["check_gta_target", "fit_gta", "gqa_to_gta"]

STATES = ("key", "joint")


@torch.no_grad()
def gqa_to_gta(model, moments: list[torch.Tensor], *, freqfold: int | None = None, state: str = "joint",
               balance: bool = True, fit: str = "bkv", progress: bool = True, stats: dict | None = None):
    """Convert an MHA/MQA/GQA kvslim Transformer to GTA with the same ``h_kv`` groups.

    Args:
        model: source kvslim ``Transformer``.
        moments: per-layer ``E[x̃x̃ᵀ]`` (calib.py).
        freqfold: FreqFold group size; default the smallest valid (``r/(d_h/2)``).
        state: how the key half of the state is chosen: ``joint`` (balanced PCA of keys and
            values; default, SmolLM2 ppl 62.3 vs 71.1 for ``key``) or ``key`` (PCA of the NoPE
            keys; exact in more cases, see the module docstring).
        balance: BKV balancing for ``state="joint"``.
        fit: ``bkv`` (the PCAs of step 3) or ``output``: the same PCAs in the output-aware metric
            of latent.py (``s1`` from the metric-weighted joint PCA, ``s2`` from the value
            residual weighted by ``M_v``; needs ``state="joint"``).
    """
    spec = check_grouped_source(model)
    check_gta_target(spec, freqfold=freqfold, state=state, fit=fit)
    return fit_gta(model, moments, freqfold=freqfold, state=state, balance=balance, fit=fit, progress=progress,
                   stats=stats)


def check_gta_target(spec: AttentionSpec, *, freqfold: int | None = None, state: str = "joint",
                     fit: str = "bkv") -> None:
    """Raise ValueError naming the bad field if ``spec`` (MHA/MQA/GQA) cannot become GTA this way."""
    if state not in STATES:
        raise ValueError(f"state must be one of {STATES}, got {state!r}")
    if fit not in FITS:
        raise ValueError(f"fit must be one of {FITS}, got {fit!r}")
    if fit == "output" and state != "joint":
        raise ValueError(f"fit='output' fits the joint state; it needs state='joint', not {state!r}")
    d = spec.head_dim
    if d % 4:
        raise ValueError(f"GTA needs head_dim divisible by 4 (d_h/2 even RoPE key), got {d}")
    if spec.rope_dim < d // 2:
        raise ValueError(f"GTA's RoPE key has d_h/2={d // 2} dims; the source rotates only {spec.rope_dim} per head")
    collapse_factor(spec.rope_dim, d // 2)
    if freqfold is not None:
        check_freqfold(spec.rope_dim, d // 2, freqfold)


@torch.no_grad()
def fit_gta(model, moments: list[torch.Tensor], *, freqfold: int | None = None, state: str = "joint",
            balance: bool = True, fit: str = "bkv", progress: bool = True, stats: dict | None = None):
    """The fit of :func:`gqa_to_gta` for a target already checked by :func:`check_gta_target`."""
    spec = model.spec
    h_q, h_kv, d = spec.num_heads, spec.num_kv_heads, spec.head_dim
    d_r, half, g_q = d // 2, d // 2, h_q // h_kv
    if freqfold is None:
        freqfold = spec.rope_dim // d_r
    L = model.config.num_layers
    if moments is None or len(moments) != L:
        raise ValueError(f"moments: need one E[x x^T] per layer ({L})")
    new_spec = AttentionSpec(kind="gta", hidden_size=spec.hidden_size, num_heads=h_q, head_dim=d, num_kv_heads=h_kv,
                             rope_theta=spec.rope_theta, rope_scaling=spec.rope_scaling, qkv_bias=spec.qkv_bias,
                             **qk_norm_fields(spec))
    out = new_model(model, new_spec)
    if stats is not None:
        stats.update(kept_rope_energy=[], key_energy=[], value_energy=[])
    for li, (src, dst) in enumerate(tqdm(list(zip(model.model.layers, out.model.layers)), desc="convert gta",
                                         unit="layer", disable=not progress, leave=False)):
        a, b = src.self_attn, dst.self_attn
        view = layer_view(a, moments[li])  # QK-norm: keys/values of the normalised keys (common.py)
        Wq, Wk, Wv, S, Wo = view.Wq, view.Wk, view.Wv, view.S, a.o_proj.weight.detach().double()
        rot = rorope_rotation(Wk @ S @ Wk.T, num_kv_heads=h_kv, head_dim=d, rope_dim=spec.rope_dim,
                              target_rope_dim=d_r, freqfold=freqfold)
        R = rot.R
        E = effective_keys(R, Wk, d_r, h_kv, d)
        kv_rows, q_rows, o_cols, k_err, v_err = [], [None] * h_q, [None] * h_q, [], []
        for j in range(h_kv):
            Ej, Vj = E[j], Wv[j * d : (j + 1) * d]
            if fit == "output":
                Mk, Mv = output_metric(S, view.query_moment, Wo, [j], g_q, d, [Ej], [Vj])
                s1, _, _ = metric_basis(torch.cat([Ej, Vj]), S, Mk + Mv, half)
            elif state == "key":
                A1, _ = top_eigvecs(Ej @ S @ Ej.T, half)
                s1 = A1.T @ Ej
            else:
                Z, _ = balanced_kv(Ej, Vj, S, balance)
                A1, _ = top_eigvecs(Z @ S @ Z.T, half)
                s1 = A1.T @ Z
            res = Vj - lstsq_map(S, Vj, s1) @ s1
            if fit == "output":
                s2, _, _ = metric_basis(res, S, Mv, half)
            else:
                A2, _ = top_eigvecs(res @ S @ res.T, half)
                s2 = A2.T @ res
            Sj = torch.cat([s1, s2])  # [d, D+1]: the tied state
            K1 = lstsq_map(S, Ej, s1)  # E_j ≈ K1 s1
            Lj = lstsq_map(S, Vj, Sj)  # V_j ≈ L_j S_j
            kv_rows.append(Sj)
            for h in range(j * g_q, (j + 1) * g_q):
                Wq_h = Wq[h * d : (h + 1) * d]
                q_rows[h] = torch.cat([K1.T @ Wq_h, R[:d_r, j * d : (j + 1) * d] @ Wq_h])
                o_cols[h] = Wo[:, h * d : (h + 1) * d] @ Lj
            if stats is not None:
                k_err.append(_explained(S, Ej, K1 @ s1))
                v_err.append(_explained(S, Vj, Lj @ Sj))
        set_queries(b, a, q_rows, view)
        set_linear(b.kv_proj, torch.cat(kv_rows))
        set_linear(b.k_rope_proj, R[:d_r] @ Wk)
        b.o_proj.weight.copy_(torch.cat(o_cols, 1).to(b.o_proj.weight.dtype))
        if stats is not None:
            stats["kept_rope_energy"].append(rot.kept_energy)
            stats["key_energy"].append(k_err)
            stats["value_energy"].append(v_err)
    return out


def _explained(S, target, approx) -> float:
    """Fraction of ``E‖target x̃‖²`` explained by ``approx`` (1 = exact)."""
    err = target - approx
    return float(1 - torch.trace(err @ S @ err.T) / torch.trace(target @ S @ target.T).clamp_min(1e-300))
