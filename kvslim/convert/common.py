"""Shared pieces of the converters: augmented weights, model rebuilding, PCA.

Weights are handled as ``W̃ = [W | b]`` (``[out, D+1]``, float64) so that biases (Qwen2)
follow every linear transform for free; a source without biases yields exactly-zero bias
columns.

:func:`layer_view` gives the converters one source layer as linear maps of inputs whose second
moments are known (:class:`LayerView`). For a plain source that input is ``x̃``. For a QK-norm
source (Qwen3) keys are not linear in ``x``, so keys and values are read as the identity maps of
``ũ = [k̂; v; 1]`` and each query head as the identity of its own normalised ``q̂_h``: the same
fits then run unchanged on the normalised keys, and :func:`set_queries` stores the per-head query
maps they produce in ``q_head_proj`` (attention/qknorm.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from kvslim.convert.calib import QKNormMoment
from kvslim.model import Transformer
from kvslim.spec import AttentionSpec

__all__ = ["FITS", "LayerView", "aug", "check_grouped_source", "layer_view", "metric_basis", "metric_eigs",
           "new_model", "output_metric", "positions", "qk_norm_fields", "set_linear", "set_queries", "sqrt_pair", "top_eigvecs"]


def positions(x: torch.Tensor) -> torch.Tensor:
    """``[B, T]`` positions ``0..T-1`` for hidden states ``x [B, T, D]`` (as Transformer.forward numbers them)."""
    B, T = x.shape[:2]
    return torch.arange(T, device=x.device).expand(B, T)


def aug(lin: nn.Linear) -> torch.Tensor:
    """``[out, in+1]`` float64: the weight with its bias (or zeros) as the last column."""
    w = lin.weight.detach().double().cpu()
    b = lin.bias.detach().double().cpu() if lin.bias is not None else torch.zeros(w.shape[0], dtype=torch.float64)
    return torch.cat([w, b[:, None]], 1)


@torch.no_grad()
def set_linear(lin: nn.Linear, w_aug: torch.Tensor) -> None:
    """Load ``[W | b]`` into ``lin``; a non-zero bias into a bias-less layer is an error."""
    if tuple(w_aug.shape) != (lin.out_features, lin.in_features + 1):
        raise ValueError(
            f"internal: weight shape {tuple(w_aug.shape)} != {(lin.out_features, lin.in_features + 1)}"
        )
    lin.weight.copy_(w_aug[:, :-1].to(lin.weight.dtype))
    if lin.bias is not None:
        lin.bias.copy_(w_aug[:, -1].to(lin.bias.dtype))
    elif w_aug[:, -1].abs().max() > 0:
        raise ValueError("internal: a bias was produced for a layer without bias")


@dataclass
class LayerView:
    """A source attention layer as linear maps (float64, ``[W | b]``) of inputs with known moments.

    Attributes:
        Wq: ``[h_q·d_h, in_q+1]`` query rows (QK-norm: ``[I | 0]`` per head, on the head's own ``q̂_h``).
        Wk, Wv: ``[h_kv·d_h, in+1]`` key / value rows on the K/V input (``x̃``, or QK-norm ``ũ``).
        S: ``[in+1, in+1]`` the K/V input's second moment (plain source: also the queries' input).
        Sq: QK-norm: ``[h_q, d_h, d_h]`` the normalised queries' moments; plain: None (``Wq S Wqᵀ``).
    """

    Wq: torch.Tensor
    Wk: torch.Tensor
    Wv: torch.Tensor
    S: torch.Tensor
    Sq: torch.Tensor | None
    head_dim: int

    @property
    def qk_norm(self) -> bool:
        """Whether the source normalises q and k (the query rows then go to ``q_head_proj``)."""
        return self.Sq is not None

    def query_moment(self, h: int) -> torch.Tensor:
        """``[d_h, d_h]`` second moment of query head h before RoPE (computed on demand: it is costly)."""
        if self.Sq is not None:
            return self.Sq[h]
        W = self.Wq[h * self.head_dim : (h + 1) * self.head_dim]
        return W @ self.S @ W.T


def layer_view(attn, moment) -> LayerView:
    """The :class:`LayerView` of source layer ``attn`` with its calibration ``moment`` (calib.py)."""
    s = attn.spec
    h_q, d, n = s.num_heads, s.head_dim, s.num_kv_heads * s.head_dim
    if s.qk_norm != isinstance(moment, QKNormMoment):
        raise ValueError(f"moments: a {'QK-norm' if s.qk_norm else 'plain'} layer needs "
                         f"{'QKNormMoment' if s.qk_norm else 'E[x x^T] tensor'}s (calib.attention_input_moments)")
    if not s.qk_norm:
        return LayerView(aug(attn.q_proj), aug(attn.k_proj), aug(attn.v_proj), moment.double(), None, d)
    eye = torch.eye(2 * n, 2 * n + 1, dtype=torch.float64)
    Wq = torch.eye(d, d + 1, dtype=torch.float64).repeat(h_q, 1)
    return LayerView(Wq, eye[:n], eye[n:], moment.kv.double(), moment.q.double(), d)


def qk_norm_fields(spec: AttentionSpec) -> dict:
    """The QK-norm fields a converted spec inherits from its source ``spec``."""
    return dict(qk_norm=spec.qk_norm, qk_norm_eps=spec.qk_norm_eps)


@torch.no_grad()
def set_queries(dst, src, rows: list[torch.Tensor], view: LayerView) -> None:
    """Write the converted query: ``rows[h]`` (``[d_qk, in_q+1]``, maps of view.Wq's input) as ``q_proj``,
    or, for a QK-norm source, as ``q_head_proj[h]`` beside the source's q/k/v projections and norms."""
    if not view.qk_norm:
        set_linear(dst.q_proj, torch.cat(rows))
        return
    if any(float(r[:, -1].abs().max()) > 0 for r in rows):
        raise ValueError("internal: a bias was produced for a normalised query")
    dst.q_head_proj.weight.copy_(torch.stack([r[:, :-1] for r in rows]).to(dst.q_head_proj.weight.dtype))
    for name in ("q_proj", "q_norm", "k_proj", "k_norm", "v_proj"):
        getattr(dst, name).load_state_dict(getattr(src, name).state_dict())


def check_grouped_source(model) -> AttentionSpec:
    spec = getattr(getattr(model, "config", None), "attention", None)
    if not isinstance(spec, AttentionSpec):
        raise TypeError(f"expected a kvslim Transformer, got {type(model).__name__}")
    if spec.kind not in ("mha", "mqa", "gqa"):
        raise ValueError(
            f"unsupported source attention kind {spec.kind!r}: converters read MHA/MQA/GQA checkpoints"
        )
    return spec


@torch.no_grad()
def new_model(model: Transformer, spec: AttentionSpec, layer_ranks: list[int] | None = None) -> Transformer:
    """A Transformer with ``spec`` attention (per-layer ``latent_dim``s ``layer_ranks``, if given) and every
    non-attention weight copied from ``model``."""
    cfg = model.config.with_attention(spec, layer_ranks)
    dtype = next(model.parameters()).dtype
    out = Transformer(cfg).to(dtype)  # (not on meta: that path imports torch._dynamo, ~5 s)
    sd = {k: v for k, v in model.state_dict().items() if ".self_attn." not in k}
    missing, unexpected = out.load_state_dict(sd, strict=False)
    assert not unexpected, unexpected
    if cfg.tie_word_embeddings:
        out.lm_head.weight = out.model.embed_tokens.weight
    for layer in out.model.layers:  # attention norms (latent_norm) start as identity
        for name, p in layer.self_attn.named_parameters():
            if "layernorm" in name:
                p.fill_(1.0)
    return out.eval()


def top_eigvecs(C: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-``k`` eigenvectors (columns, descending eigenvalue) and all eigenvalues of symmetric C."""
    C = (C + C.T) / 2
    evals, evecs = torch.linalg.eigh(C)
    order = torch.argsort(evals, descending=True)
    return evecs[:, order[:k]], evals[order].clamp_min(0)


def balanced_kv(K: torch.Tensor, V: torch.Tensor, S: torch.Tensor, balance: bool) -> tuple[torch.Tensor, float]:
    """``(Z, alpha)``: keys and values stacked for a joint PCA, ``Z = [K / alpha; V]``.

    With ``balance`` (TransMLA's BKV), ``alpha = sqrt(E‖K x̃‖² / E‖V x̃‖²)`` under ``E[x̃x̃ᵀ] = S``
    puts both halves at equal energy; otherwise (or if either is zero) ``alpha = 1``.
    """
    alpha = 1.0
    if balance:
        alpha = math.sqrt(energy_ratio(float(torch.trace(K @ S @ K.T)), float(torch.trace(V @ S @ V.T))))
    return torch.cat([K / alpha, V]), alpha


def energy_ratio(ek: float, ev: float) -> float:
    """``ek / ev`` for balancing keys against values; 1 when either energy is zero or below 1e-12 of the
    other: it is then rounding noise (keys that RoPE takes whole, normalised keys duplicated across heads),
    which balancing would blow up to the other's size and fit in place of real directions."""
    if ek <= 1e-12 * ev or ev <= 1e-12 * ek:
        return 1.0
    return ek / ev


def lstsq_map(S: torch.Tensor, target: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """``L`` minimising ``E‖target x̃ - L basis x̃‖²`` under ``E[x̃x̃ᵀ] = S`` (rows are linear maps)."""
    G = basis @ S @ basis.T
    G = G + 1e-12 * G.diagonal().mean() * torch.eye(G.shape[0], dtype=G.dtype)
    return torch.linalg.solve(G, basis @ S @ target.T).T


FITS = ("bkv", "output")


def sqrt_pair(M: torch.Tensor, ridge: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """``(M^{1/2}, M^{-1/2})`` of a PSD matrix, with a relative ridge so the inverse exists."""
    M = (M + M.T) / 2
    M = M + ridge * M.diagonal().mean().clamp_min(1e-300) * torch.eye(M.shape[0], dtype=M.dtype)
    w, U = torch.linalg.eigh(M)
    w = w.clamp_min(w.max() * 1e-12)
    return (U * w.sqrt()) @ U.T, (U / w.sqrt()) @ U.T


def output_metric(S: torch.Tensor, query_moment, Wo: torch.Tensor, groups, g_q: int, d: int,
                  keys: list[torch.Tensor], values: list[torch.Tensor]) -> tuple[list, list]:
    """Per group j: ``(β·M_k[j], M_v[j])``, the metrics of the output-aware fit.

    A key error ``δk`` of group j changes head h's score by ``q_hᵀ δk``, so over calibration
    queries its cost is ``δkᵀ M_k δk`` with ``M_k = Σ_{h∈j} W_q[h] Σ W_q[h]ᵀ`` (the group's query
    second moment); a value error ``δv`` reaches the residual stream as ``W_o[:, h] δv``, cost
    ``δvᵀ M_v δv`` with ``M_v = Σ_{h∈j} W_o[:, h]ᵀ W_o[:, h]``. ``β`` puts the weighted key and
    value energies ``Σ_j tr(M C)`` equal (the balancing of BKV, in the output metric).
    ``query_moment(h)`` is head h's query moment (``W_q[h] Σ W_q[h]ᵀ``, ``LayerView.query_moment``);
    ``keys[j]``, ``values[j]`` are the group's ``[d, in+1]`` projections whose moments C are taken under ``S``.
    """
    Mk, Mv, ek, ev = [], [], 0.0, 0.0
    for j, K, V in zip(groups, keys, values):
        heads = range(j * g_q, (j + 1) * g_q)
        mk = sum(query_moment(h) for h in heads)
        mv = sum(Wo[:, h * d : (h + 1) * d].T @ Wo[:, h * d : (h + 1) * d] for h in heads)
        ek += float(torch.trace(mk @ K @ S @ K.T))
        ev += float(torch.trace(mv @ V @ S @ V.T))
        Mk.append(mk)
        Mv.append(mv)
    beta = 1 / energy_ratio(ek, ev)
    return [beta * m for m in Mk], Mv


def metric_basis(Z: torch.Tensor, S: torch.Tensor, blocks: list[torch.Tensor], k: int):
    """Rank-``k`` fit of ``Z x̃`` minimising ``E‖M^{1/2}(Z x̃ - U D Z x̃)‖²``, ``M = blockdiag(blocks)``.

    Returns ``(down [k, D+1] = the latent rows, up [rows(Z), k], eigenvalues)``: the latent is
    ``down @ x̃`` and ``Z x̃ ≈ up @ latent``. With ``M = I`` this is the PCA of BKV; at full rank
    it is exact (``up @ down`` is the identity on the span of ``Z``).
    """
    Mh, Mih, U, evals = metric_eigs(Z, S, blocks)
    U = U[:, :k].contiguous()
    return U.T @ Mh @ Z, Mih @ U, evals


def metric_eigs(Z: torch.Tensor, S: torch.Tensor, blocks: list[torch.Tensor]):
    """What :func:`metric_basis` fits at every rank: ``(M^{1/2}, M^{-1/2}, U, eigenvalues)``, ``U`` the
    eigenvectors of ``M^{1/2} Z Σ Zᵀ M^{1/2}`` by descending eigenvalue (rank k takes ``U[:, :k]``)."""
    pairs = [sqrt_pair(b) for b in blocks]
    Mh, Mih = torch.block_diag(*[p[0] for p in pairs]), torch.block_diag(*[p[1] for p in pairs])
    if Mh.shape[0] != Z.shape[0]:
        raise ValueError(f"internal: metric of {Mh.shape[0]} rows for {Z.shape[0]} rows")
    U, evals = top_eigvecs(Mh @ Z @ S @ Z.T @ Mh, Z.shape[0])
    return Mh, Mih, U, evals
