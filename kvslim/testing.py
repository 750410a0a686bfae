"""Shared test helpers: tiny specs/models for every variant and one ``assert_close``."""

from __future__ import annotations

import torch

from kvslim.model import ModelConfig, Transformer
from kvslim.spec import AttentionSpec

#: one small spec per variant (h_q = 4, d_h = 16): the unit-test backbone
TINY_PRESETS = ("mha", "mqa", "gqa-2", "gta-2", "mla", "gla-2")


def tiny_spec(name: str, *, num_heads: int = 4, head_dim: int = 16, hidden_size: int = 64, **kw) -> AttentionSpec:
    return AttentionSpec.preset(name, num_heads=num_heads, head_dim=head_dim, hidden_size=hidden_size, **kw)


def tiny_model(spec: AttentionSpec, *, vocab: int = 97, layers: int = 2, seed: int = 0,
               tie: bool = False, layer_ranks: list[int] | None = None) -> Transformer:
    """A small random model; ``layer_ranks`` (mla/gla): per-layer latent dims (``spec.latent_dim`` is ignored)."""
    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=vocab, hidden_size=spec.hidden_size, intermediate_size=2 * spec.hidden_size,
                      num_layers=layers, attention=spec, tie_word_embeddings=tie)
    if layer_ranks is not None:
        cfg = cfg.with_layer_ranks(layer_ranks)
    model = Transformer(cfg).eval()
    # non-trivial norm weights so that errors in their handling are visible
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("layernorm.weight") or name.endswith("norm.weight"):
                p.copy_(1 + 0.1 * torch.randn_like(p))
    return model


def assert_close(actual: torch.Tensor, expected: torch.Tensor, *, atol: float = 1e-5, rtol: float = 1e-5,
                 baseline: torch.Tensor | None = None, msg: str = "") -> None:
    """The project's one closeness check; the failure message reports the max diff and RMS-error ratio.

    Without ``baseline``: elementwise ``|actual - expected| <= atol + rtol |expected|``.
    With ``baseline`` (the same computation in the kernel's low precision, STYLE.md §5):
    ``max |actual - expected| <= 2 max |baseline - expected| + atol * max(1, max |expected|)``.
    NaN anywhere in ``actual`` fails (outputs are poisoned with NaN before kernels run).
    """
    a, e = actual.double(), expected.double()
    if a.shape != e.shape:
        raise AssertionError(f"{msg} shape {tuple(a.shape)} != {tuple(e.shape)}")
    if torch.isnan(a).any():
        raise AssertionError(f"{msg} output has NaN (unwritten elements?)")
    diff = (a - e).abs()
    rms = (diff.pow(2).mean().sqrt() / e.pow(2).mean().sqrt().clamp_min(1e-30)).item()
    if baseline is None:
        if not torch.all(diff <= atol + rtol * e.abs()):
            raise AssertionError(f"{msg} max abs diff {diff.max().item():.3e}, rms ratio {rms:.3e}")
        return
    err = diff.max().item()
    bound = 2 * (baseline.double() - e).abs().max().item() + atol * e.abs().max().clamp_min(1.0).item()
    if err > bound:
        raise AssertionError(f"{msg} max err {err:.3e} > bound {bound:.3e} (rms ratio {rms:.2e})")
