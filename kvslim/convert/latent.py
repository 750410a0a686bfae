"""The shared latent core: GQA -> MLA / GLA (TransMLA §4: merged keys, RoRoPE + FreqFold,
BKV-PCA; seed 000 §3.3.2 GLA). MLA is the one-latent-head case of the same fit.

GLA: latent head c serves the query heads of KV groups ``c·h_kv/h_c … (c+1)·h_kv/h_c - 1``
and stores the top ``d_c`` components of their balanced ``[E_j/α_c; V_j]``; one RoPE key of
``d_R`` is shared by all heads, as in MLA.

Per layer, with source ``q_h = W_q[h] x``, ``k_j = W_k[j] x``, ``v_j = W_v[j] x`` (head h in
group j = g(h)) and the calibrated input moment ``Σ = E[x̃x̃ᵀ]`` (calib.py):

1. **RoRoPE** (rorope.py): orthogonal ``R`` on the merged key ``k = [k_0 … k_{h_kv-1}]``;
   ``R[:d_R] k`` is the shared RoPE key, ``R[d_R:] k = K_nope`` the rest.
2. The NoPE score of head h is ``q_hᵀ R_{nope,j}ᵀ K_nope = q_hᵀ E_j x`` with
   ``E_j = R_{nope,j}ᵀ R_nope W_k`` (``R_{nope,j}`` = the columns of group j): group j's key
   minus what RoPE keeps. So the query keeps its original NoPE part (``qk_nope_head_dim =
   d_h``) and gets a RoPE part ``R_{rope,j} q_h``: everything on the key side is absorbed
   into ``kv_b_proj``, the RoPE rotation into ``q_proj``.
3. **BKV-PCA** per latent head c (MLA: one; GLA: ``h_c``, latent c serving groups
   ``G_c``): ``Z_c = [E_j/α_c (j ∈ G_c); W_v[j] (j ∈ G_c)]``, ``α_c`` = RMS ratio of the
   keys to the values (balance), ``A_c`` = top ``d_c`` eigenvectors of ``Z_c Σ Z_cᵀ``;
   latent ``c = A_cᵀ Z_c x̃``, ``W_UK[h] = α_c A_c[E_j rows]``, ``W_UV[h] = A_c[V_j rows]``.
   (For MLA the stacked ``E_j`` are an isometric image of ``K_nope``, so this is exactly the
   joint PCA of ``[K_nope; V]``.)
3'. **Output-aware fit** (``fit="output"``, beyond TransMLA). BKV-PCA already whitens by the
   calibration input (its PCA is of ``Z_c Σ Z_cᵀ``, so it minimises the error of the K/V
   *outputs* over the input distribution), but measures that error in the raw key/value
   space with one scalar ``α``. What matters downstream is the score error ``q_hᵀ δk`` and the
   residual-stream error ``W_o[:, h] δv``; so the fit minimises ``E‖M^{1/2}(Z_c x̃ - Z̃_c x̃)‖²``
   with ``M = blockdiag(β M_k[j], M_v[j])``, ``M_k[j] = Σ_{h∈j} W_q[h] Σ W_q[h]ᵀ`` (the group's
   query second moment), ``M_v[j] = Σ_{h∈j} W_o[:,h]ᵀ W_o[:,h]``, ``β`` equalising the weighted
   key and value energies (common.py ``output_metric``). Solution: ``U`` = top ``d_c``
   eigenvectors of ``M^{1/2} Z_c Σ Z_cᵀ M^{1/2}``, latent ``Uᵀ M^{1/2} Z_c x̃``, up-projections
   ``M^{-1/2} U`` (``metric_basis``). Same cache, same exactness at full rank.
4. Softmax scale: MLA uses ``1/sqrt(d_nope + d_R)``; ``q_proj`` is multiplied by
   ``sqrt((d_h + d_R)/d_h)`` so scores keep the source's ``1/sqrt(d_h)``.

``method="mha2mla"`` is the baseline of MHA2MLA (Ji et al., 2025) on the same skeleton:
partial RoPE keeping the highest-norm (head, frequency) pair per slot (no rotation), and a
plain SVD of the weights ``[W_K_nope; W_V]`` (no calibration, no balancing).

Exact (to float error) at full rank ``d_c = max_latent_dim``: the latents then span
``[K_nope; V]``, so the model equals the partial-RoPE model; that equals the source when
RoPE drops nothing (MQA, or keys whose heads are rank 1 per frequency; tested).

A QK-norm source (Qwen3) is fit the same way on its normalised keys (common.py ``layer_view``): the
latent and RoPE key read ``u = [k̂; v]`` and the query maps go to ``q_head_proj``
(attention/qknorm.py); exact at full rank under the same condition (tests/test_qknorm.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from kvslim.convert.common import (
    FITS,
    LayerView,
    balanced_kv,
    check_grouped_source,
    layer_view,
    metric_eigs,
    new_model,
    output_metric,
    qk_norm_fields,
    set_linear,
    set_queries,
    top_eigvecs,
)
from kvslim.convert.ranks import allocate_ranks, check_rank_alloc, resolve_rank_min
from kvslim.convert.rorope import (
    check_freqfold,
    check_repeat,
    collapse_factor,
    effective_keys,
    norm_selection,
    rorope_rotation,
)
from kvslim.spec import AttentionSpec

__all__ = ["LayerFit", "check_latent_target", "gqa_to_gla", "gqa_to_latent", "gqa_to_mla", "layer_fit", "layer_spectra",
           "max_latent_dim"]

METHODS = ("transmla", "mha2mla")


def max_latent_dim(spec: AttentionSpec, latent_heads: int, rope_dim: int) -> int:
    """Largest useful ``d_c`` per latent head: rank of ``[E_j (j ∈ G_c); V_j (j ∈ G_c)]``."""
    G = spec.num_kv_heads // latent_heads
    n_k = spec.num_kv_heads * spec.head_dim - rope_dim
    return min(G * spec.head_dim, n_k) + G * spec.head_dim


def check_latent_target(spec: AttentionSpec, latent_heads, latent_dim, rope_dim, method="transmla",
                        freqfold=None, fit="bkv", rope_repeat=1) -> None:
    """Raise ValueError naming the bad field if ``spec`` (MHA/MQA/GQA) cannot be fit to this latent target."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if fit not in FITS:
        raise ValueError(f"fit must be one of {FITS}, got {fit!r}")
    if fit != "bkv" and method != "transmla":
        raise ValueError(f"fit={fit!r} refits TransMLA's latent; it does not apply to method={method!r}")
    if spec.qk_norm and method != "transmla":
        raise ValueError(f"method={method!r} is a weight SVD of [W_K_nope; W_V]; a QK-norm source's keys are "
                         "normalised per head, not a linear map of x, so only method='transmla' applies")
    collapse_factor(spec.rope_dim, rope_dim, rope_repeat)
    if rope_repeat > 1:
        if method != "transmla":
            raise ValueError(f"rope_repeat={rope_repeat} keeps several RoRoPE components per frequency; "
                             f"method={method!r} selects single (head, frequency) pairs, so it needs rope_repeat=1")
        check_repeat(spec.num_kv_heads, spec.rope_dim, rope_dim, rope_repeat)
    for name, v in (("latent_heads", latent_heads), ("latent_dim (kv_lora_rank)", latent_dim)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ValueError(f"{name} must be a positive int, got {v!r}")
    if spec.num_kv_heads % latent_heads:
        raise ValueError(
            f"latent_heads={latent_heads} must divide the source's num_kv_heads={spec.num_kv_heads} "
            "(each latent head compresses whole KV groups)"
        )
    cap = max_latent_dim(spec, latent_heads, rope_dim)
    if latent_dim > cap:
        raise ValueError(
            f"latent_dim (kv_lora_rank) = {latent_dim} is larger than possible: per latent head the "
            f"keys and values span at most {cap} dims (h_kv={spec.num_kv_heads}, d_h={spec.head_dim}, "
            f"d_R={rope_dim}, latent_heads={latent_heads})"
        )
    if method == "transmla" and freqfold is not None:
        check_freqfold(spec.rope_dim, rope_dim, freqfold, rope_repeat)


def layer_rotation(view: LayerView, spec: AttentionSpec, rope_dim: int, freqfold: int, method: str,
                   rope_repeat: int = 1):
    Sk = view.Wk @ view.S @ view.Wk.T
    kw = dict(num_kv_heads=spec.num_kv_heads, head_dim=spec.head_dim, rope_dim=spec.rope_dim,
              target_rope_dim=rope_dim)
    if method == "mha2mla":
        return norm_selection(Sk, view.Wq @ view.S @ view.Wq.T, num_heads=spec.num_heads, **kw)
    return rorope_rotation(Sk, freqfold=freqfold, repeat=rope_repeat, **kw)


@torch.no_grad()
def gqa_to_latent(model, moments: list[torch.Tensor] | None, *, latent_heads: int, latent_dim: int,
                  rope_dim: int, freqfold: int | None = None, method: str = "transmla", balance: bool = True,
                  fit: str = "bkv", rank_alloc: str = "uniform", rank_min: int | None = None, progress: bool = True,
                  stats: dict | None = None, rope_repeat: int = 1):
    """Convert an MHA/MQA/GQA kvslim Transformer to MLA (``latent_heads=1``) or GLA.

    Args:
        model: source kvslim ``Transformer`` (kind mha/mqa/gqa).
        moments: per-layer ``E[x̃x̃ᵀ]`` from ``attention_input_moments`` (required for
            ``method="transmla"``; the baseline uses them only to pick RoPE frequencies).
        latent_heads: ``h_c`` (1 = MLA).
        latent_dim: ``d_c`` per latent head (DeepSeek's ``kv_lora_rank`` for MLA); with
            ``rank_alloc="energy"`` the mean over layers (the budget is ``num_layers · latent_dim``).
        rope_dim: ``d_R`` of the shared RoPE key (must divide the source's rotary dims).
        freqfold: FreqFold group size (transmla only); default the smallest valid one,
            ``c = r/(d_R/rope_repeat)`` (1 when d_R equals the source's rotary dims).
        rope_repeat: RoRoPE components kept per RoPE frequency (``AttentionSpec.rope_repeat``; transmla
            only): ``d_R = 2r, rope_repeat = 2`` is two KV heads' worth of RoPE (kvslim format only).
        method: ``transmla`` (RoRoPE + BKV-PCA) or ``mha2mla`` (norm-selected partial RoPE +
            weight SVD).
        balance: BKV balancing (transmla only).
        fit: ``bkv`` (TransMLA: PCA of the balanced ``[K_nope; V]``) or ``output`` (the
            output-aware metric of the module docstring, step 3').
        rank_alloc: ``uniform`` (every layer ``latent_dim``), ``energy`` (per-layer ranks by greedy
            marginal gain on each layer's fit objective, ranks.py) or ``relative`` (the same on each layer's
            fraction of its energy), ``rank_min`` the least per layer.
        stats: optional dict that receives per-layer diagnostics.
    Returns:
        a new ``Transformer`` with kind mla/gla, ``latent_norm=False``.
    """
    spec = check_grouped_source(model)
    check_latent_target(spec, latent_heads, latent_dim, rope_dim, method, freqfold, fit, rope_repeat)
    check_rank_alloc(rank_alloc, to="mla" if latent_heads == 1 else "gla", latent_dim=latent_dim, rank_min=rank_min,
                     cap=max_latent_dim(spec, latent_heads, rope_dim))
    return fit_latent(model, moments, latent_heads=latent_heads, latent_dim=latent_dim, rope_dim=rope_dim,
                      freqfold=freqfold, method=method, balance=balance, fit=fit, rank_alloc=rank_alloc,
                      rank_min=rank_min, progress=progress, stats=stats, rope_repeat=rope_repeat)


@dataclass
class LayerFit:
    """One layer's latent fit at every rank: rank ``r`` keeps the first ``r`` components of each head.

    ``heads[c]``: ``(method, Z, basis, evals, extra)`` of latent head c, ``basis`` its eigenvectors
    (or left singular vectors) by descending ``evals``; ``extra`` = ``α`` (bkv) or ``(M^{1/2}, M^{-1/2})``
    (output). ``q_rows``: per query head its new rows ``[d_qk, in_q+1]`` (rank-independent; ``set_queries``
    writes them); ``rope_rows``: the RoPE key rows; ``view``: the source layer as linear maps.
    """

    heads: list
    q_rows: list
    rope_rows: torch.Tensor
    kept_rope_energy: float
    cap: int  # the largest useful rank (max_latent_dim)
    view: LayerView

    @property
    def spectra(self) -> list[torch.Tensor]:
        """Per latent head, the eigenvalues of the fit (descending, up to ``cap``): the error of rank r is
        the sum of those past r (ranks.py allocates on it)."""
        return [h[3][: self.cap] for h in self.heads]

    def latent(self, c: int, r: int) -> tuple[torch.Tensor, torch.Tensor, float, float]:
        """``(latent rows [r, D+1], up [rows, r], α, energy kept)`` of latent head c at rank r."""
        method, Z, basis, evals, extra = self.heads[c]
        energy = float(evals[:r].sum() / evals.sum().clamp_min(1e-300))
        if method == "output":
            Mh, Mih = extra
            U = basis[:, :r].contiguous()
            return U.T @ Mh @ Z, Mih @ U, 1.0, energy
        A = basis[:, :r] if method == "mha2mla" else basis[:, :r].contiguous()
        return A.T @ Z, A, extra, energy


def layer_fit(attn, moment, spec: AttentionSpec, *, latent_heads: int, rope_dim: int, freqfold: int,
              method: str, balance: bool, fit: str, rope_repeat: int = 1) -> LayerFit:
    """The full-rank fit of one source attention layer (module docstring, steps 1-3') from its calibration
    ``moment`` (``E[x̃x̃ᵀ]``, or a ``QKNormMoment`` for a QK-norm source)."""
    h_q, h_kv, d = spec.num_heads, spec.num_kv_heads, spec.head_dim
    g_q, G = h_q // h_kv, h_kv // latent_heads
    view = layer_view(attn, moment)  # QK-norm: keys/values of the normalised keys (common.py)
    Wq, Wk, Wv, S, Wo = view.Wq, view.Wk, view.Wv, view.S, attn.o_proj.weight.detach().double().cpu()
    rot = layer_rotation(view, spec, rope_dim, freqfold, method, rope_repeat)
    R = rot.R
    E = effective_keys(R, Wk, rope_dim, h_kv, d)  # [h_kv, d, D+1]
    heads = []
    for c in range(latent_heads):
        groups = range(c * G, (c + 1) * G)
        Ek = torch.cat([E[j] for j in groups])
        Vc = torch.cat([Wv[j * d : (j + 1) * d] for j in groups])
        if fit == "output":
            Mk, Mv = output_metric(S, view.query_moment, Wo, groups, g_q, d, [E[j] for j in groups],
                                   [Wv[j * d : (j + 1) * d] for j in groups])
            Z = torch.cat([Ek, Vc])
            Mh, Mih, U, evals = metric_eigs(Z, S, Mk + Mv)
            heads.append(("output", Z, U, evals, (Mh, Mih)))
        elif method == "transmla":
            Z, alpha = balanced_kv(Ek, Vc, S, balance)
            A, evals = top_eigvecs(Z @ S @ Z.T, Z.shape[0])
            heads.append(("bkv", Z, A, evals, alpha))
        else:
            Z = torch.cat([Ek, Vc])
            U, sv, _ = torch.linalg.svd(Z[:, :-1], full_matrices=False)
            heads.append(("mha2mla", Z, U, sv.pow(2), 1.0))
    gamma = math.sqrt((d + rope_dim) / d)  # keep the source's 1/sqrt(d_h) softmax scale
    q_rows = []
    for h in range(h_q):
        j = h // g_q
        Wq_h = Wq[h * d : (h + 1) * d]
        q_rows.append(torch.cat([gamma * Wq_h, gamma * (R[:rope_dim, j * d : (j + 1) * d] @ Wq_h)]))
    return LayerFit(heads, q_rows, R[:rope_dim] @ Wk, rot.kept_energy, max_latent_dim(spec, latent_heads, rope_dim),
                    view)


def set_layer(attn, src, lf: LayerFit, spec: AttentionSpec, latent_heads: int, r: int) -> tuple[list, list]:
    """Write ``lf`` at rank ``r`` into the converted attention ``attn`` (``src``: the source attention).

    Returns per latent head ``(α, energy kept)`` lists for the diagnostics.
    """
    h_q, d = spec.num_heads, spec.head_dim
    g_q, G = h_q // spec.num_kv_heads, spec.num_kv_heads // latent_heads
    lat_rows, w_kv_b, alphas, energies = [], [None] * h_q, [], []
    for c in range(latent_heads):
        rows, up, alpha, energy = lf.latent(c, r)
        lat_rows.append(rows)
        alphas.append(alpha)
        energies.append(energy)
        for gi, j in enumerate(range(c * G, (c + 1) * G)):
            up_k, up_v = up[gi * d : (gi + 1) * d] * alpha, up[G * d + gi * d : G * d + (gi + 1) * d]
            for h in range(j * g_q, (j + 1) * g_q):
                w_kv_b[h] = torch.cat([up_k, up_v])  # [2d, d_c]: rows [W_UK ; W_UV]
    set_queries(attn, src, lf.q_rows, lf.view)
    set_linear(attn.kv_a_proj_with_mqa, torch.cat(lat_rows + [lf.rope_rows]))
    attn.kv_b_proj.weight.copy_(torch.cat(w_kv_b).to(attn.kv_b_proj.weight.dtype))
    attn.o_proj.weight.copy_(src.o_proj.weight)
    return alphas, energies


def _fits(model, moments, spec, kw: dict, progress: bool, desc: str):
    """Per source layer, its :func:`layer_fit` (a generator: one layer's fit in memory at a time)."""
    for li, src in enumerate(tqdm(model.model.layers, desc=desc, unit="layer", disable=not progress, leave=False)):
        yield layer_fit(src.self_attn, moments[li], spec, **kw)


@torch.no_grad()
def layer_spectra(model, moments, *, latent_heads: int, rope_dim: int, freqfold: int | None = None,
                  method: str = "transmla", balance: bool = True, fit: str = "bkv", progress: bool = False,
                  rope_repeat: int = 1):
    """Per layer, per latent head: the fit's eigenvalues (what ``rank_alloc="energy"`` allocates on)."""
    spec = model.spec
    freqfold = collapse_factor(spec.rope_dim, rope_dim, rope_repeat) if freqfold is None else freqfold
    kw = dict(latent_heads=latent_heads, rope_dim=rope_dim, freqfold=freqfold, method=method, balance=balance, fit=fit,
              rope_repeat=rope_repeat)
    return [lf.spectra for lf in _fits(model, moments, spec, kw, progress, "spectra")]


@torch.no_grad()
def fit_latent(model, moments, *, latent_heads: int, latent_dim: int, rope_dim: int, freqfold: int | None = None,
               method: str = "transmla", balance: bool = True, fit: str = "bkv", rank_alloc: str = "uniform",
               rank_min: int | None = None, progress: bool = True, stats: dict | None = None, rope_repeat: int = 1):
    """The fit of :func:`gqa_to_latent` for a target already checked by :func:`check_latent_target`
    (and :func:`check_rank_alloc`)."""
    spec = model.spec
    if freqfold is None:
        freqfold = collapse_factor(spec.rope_dim, rope_dim, rope_repeat)
    L = model.config.num_layers
    if moments is None or len(moments) != L:
        raise ValueError(f"moments: need one E[x x^T] per layer ({L}), got {None if moments is None else len(moments)}")
    kw = dict(latent_heads=latent_heads, rope_dim=rope_dim, freqfold=freqfold, method=method, balance=balance, fit=fit,
              rope_repeat=rope_repeat)
    name = "mla" if latent_heads == 1 else f"gla-{latent_heads}"
    fits = _fits(model, moments, spec, kw, progress, f"convert {name}")
    ranks, alloc = [latent_dim] * L, None
    if rank_alloc != "uniform":  # every layer's spectrum first: the allocation needs them all
        fits = list(fits)
        ranks, alloc = allocate_ranks([lf.spectra for lf in fits], budget=latent_dim, rank_min=resolve_rank_min(rank_min),
                                      cap=fits[0].cap, relative=rank_alloc == "relative")
    new_spec = AttentionSpec(
        kind="mla" if latent_heads == 1 else "gla", hidden_size=spec.hidden_size, num_heads=spec.num_heads,
        head_dim=spec.head_dim, num_latent_heads=latent_heads, latent_dim=max(ranks), rope_dim=rope_dim,
        v_head_dim=spec.head_dim, rope_theta=spec.rope_theta, rope_scaling=spec.rope_scaling, latent_norm=False,
        rope_repeat=rope_repeat, qkv_bias=spec.qkv_bias, num_kv_heads=spec.num_kv_heads if spec.qk_norm else None, **qk_norm_fields(spec),
    )
    out = new_model(model, new_spec, ranks)
    if stats is not None:
        stats.update(kept_rope_energy=[], alpha=[], latent_energy=[], layer_ranks=list(ranks))
        if alloc is not None:
            stats["rank_alloc"] = alloc
    for li, (lf, src, dst) in enumerate(zip(fits, model.model.layers, out.model.layers)):
        alphas, energies = set_layer(dst.self_attn, src.self_attn, lf, spec, latent_heads, ranks[li])
        if stats is not None:
            stats["kept_rope_energy"].append(lf.kept_rope_energy)
            stats["alpha"].append(alphas)
            stats["latent_energy"].append(energies)
    return out


def gqa_to_mla(model, moments, *, kv_lora_rank: int, rope_dim: int = 64, freqfold: int | None = None,
               method: str = "transmla", balance: bool = True, fit: str = "bkv", rank_alloc: str = "uniform",
               rank_min: int | None = None, progress: bool = True, stats: dict | None = None, rope_repeat: int = 1):
    """GQA -> MLA (TransMLA): one latent of ``kv_lora_rank`` (the mean over layers with ``rank_alloc="energy"``)
    + one shared RoPE key of ``rope_dim``."""
    return gqa_to_latent(model, moments, latent_heads=1, latent_dim=kv_lora_rank, rope_dim=rope_dim,
                         freqfold=freqfold, method=method, balance=balance, fit=fit, rank_alloc=rank_alloc,
                         rank_min=rank_min, progress=progress, stats=stats, rope_repeat=rope_repeat)


def gqa_to_gla(model, moments, *, latent_heads: int, latent_dim: int, rope_dim: int = 64, freqfold: int | None = None,
               method: str = "transmla", balance: bool = True, fit: str = "bkv", rank_alloc: str = "uniform",
               rank_min: int | None = None, progress: bool = True, stats: dict | None = None, rope_repeat: int = 1):
    """GQA -> GLA with ``latent_heads`` latents of ``latent_dim`` each (must divide h_kv)."""
    return gqa_to_latent(model, moments, latent_heads=latent_heads, latent_dim=latent_dim, rope_dim=rope_dim,
                         freqfold=freqfold, method=method, balance=balance, fit=fit, rank_alloc=rank_alloc,
                         rank_min=rank_min, progress=progress, stats=stats, rope_repeat=rope_repeat)
