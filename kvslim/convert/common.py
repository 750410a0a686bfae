"""Shared pieces of the converters: augmented weights, model rebuilding, PCA.

Weights are handled as ``W̃ = [W | b]`` (``[out, D+1]``, float64) so that biases (Qwen2)
follow every linear transform for free; a source without biases yields exactly-zero bias
columns.
"""

from __future__ import annotations

import torch
from torch import nn

from kvslim.model import ModelConfig, Transformer
from kvslim.spec import AttentionSpec

__all__ = ["aug", "check_grouped_source", "new_model", "set_linear", "top_eigvecs"]


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
def new_model(model: Transformer, spec: AttentionSpec) -> Transformer:
    """A Transformer with ``spec`` attention and every non-attention weight copied from ``model``."""
    d = model.config.to_dict()
    d["attention"] = spec
    cfg = ModelConfig(**d)
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
        ek, ev = torch.trace(K @ S @ K.T), torch.trace(V @ S @ V.T)
        alpha = float((ek / ev).sqrt()) if ek > 0 and ev > 0 else 1.0
    return torch.cat([K / alpha, V]), alpha


def lstsq_map(S: torch.Tensor, target: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """``L`` minimising ``E‖target x̃ - L basis x̃‖²`` under ``E[x̃x̃ᵀ] = S`` (rows are linear maps)."""
    G = basis @ S @ basis.T
    G = G + 1e-12 * G.diagonal().mean() * torch.eye(G.shape[0], dtype=G.dtype)
    return torch.linalg.solve(G, basis @ S @ target.T).T
