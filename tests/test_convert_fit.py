"""The output-aware latent fit (``fit="output"``): exact at full rank, same cache budget, and the
weighted objective it claims to minimise."""

import pytest
import torch
from test_convert import _cached, _model, _moments, _rank1_keys, _spec, _tokens

from kvslim.convert import gqa_to_gta, gqa_to_latent, gqa_to_mla, max_latent_dim
from kvslim.convert.common import metric_basis, top_eigvecs
from kvslim.convert.pipeline import check_conversion
from kvslim.testing import assert_close


@pytest.mark.parametrize("case", ["mqa", "rank1-gqa", "rank1-gqa-bias"])
def test_output_fit_full_rank_reproduces_logits(case):
    m = _model(_spec(h_kv=1)) if case == "mqa" else _rank1_keys(_model(_spec(h_kv=2, bias=case.endswith("bias"))))
    full = max_latent_dim(m.spec, 1, m.spec.rope_dim)
    out = gqa_to_mla(m, _moments(m), kv_lora_rank=full, rope_dim=m.spec.rope_dim, fit="output", progress=False)
    tok = _tokens()
    with torch.no_grad():
        ref = m(tok)
        assert_close(out(tok), ref, atol=1e-7)
    assert_close(_cached(out, tok, 5), ref, atol=1e-4)


def test_output_fit_gla_full_rank_exact_and_budget():
    m = _rank1_keys(_model(_spec(h_kv=2)))
    cap = max_latent_dim(m.spec, 2, 16)
    out = gqa_to_latent(m, _moments(m), latent_heads=2, latent_dim=cap, rope_dim=16, fit="output", progress=False)
    tok = _tokens()
    with torch.no_grad():
        assert_close(out(tok), m(tok), atol=1e-7)
    for r in (4, 9):
        for fit in ("bkv", "output"):
            o = gqa_to_latent(m, _moments(m), latent_heads=2, latent_dim=r, rope_dim=16, fit=fit, progress=False)
            assert o.spec.row_dim == 2 * r + 16  # the cache holds exactly h_c·d_c + d_R per token
            assert o.model.layers[0].self_attn.kv_a_proj_with_mqa.out_features == 2 * r + 16


def test_output_fit_differs_from_bkv_and_error_shrinks_with_rank():
    m = _model(_spec(h_kv=2))
    mom, tok = _moments(m, n=16), _tokens()
    with torch.no_grad():
        ref = m(tok)
        errs = [float((gqa_to_mla(m, mom, kv_lora_rank=r, rope_dim=16, fit="output", progress=False)(tok)
                       - ref).pow(2).mean()) for r in (8, 24, 48)]
        bkv = gqa_to_mla(m, mom, kv_lora_rank=8, rope_dim=16, progress=False)(tok)
        out = gqa_to_mla(m, mom, kv_lora_rank=8, rope_dim=16, fit="output", progress=False)(tok)
    assert errs == sorted(errs, reverse=True), errs
    assert (bkv - out).abs().max() > 1e-6


def test_metric_basis_minimises_the_weighted_error():
    g = torch.Generator().manual_seed(0)
    n, D, k = 12, 20, 4
    Z = torch.randn(n, D, generator=g, dtype=torch.float64)
    X = torch.randn(D, 3 * D, generator=g, dtype=torch.float64)
    S = X @ X.T / X.shape[1]
    blocks = [(lambda a: a @ a.T)(torch.randn(6, 6, generator=g, dtype=torch.float64)) for _ in range(2)]
    M = torch.block_diag(*blocks)

    def werr(P):  # E‖M^{1/2}(Z x - P Z x)‖² = tr(M (I-P) C (I-P)ᵀ), C = Z S Zᵀ
        E = torch.eye(n, dtype=torch.float64) - P
        return float(torch.trace(M @ E @ Z @ S @ Z.T @ E.T))

    down, up, _ = metric_basis(Z, S, blocks, k)
    P_metric = up @ down @ torch.linalg.pinv(Z)  # the map Z x -> reconstruction (Z has full row rank)
    A, _ = top_eigvecs(Z @ S @ Z.T, k)
    assert werr(P_metric) < werr(A @ A.T)
    for _ in range(20):  # no random rank-k projection (orthogonal in the metric) does better
        Q, _ = torch.linalg.qr(torch.randn(n, k, generator=g, dtype=torch.float64))
        assert werr(P_metric) <= werr(Q @ Q.T) + 1e-9
    full_down, full_up, _ = metric_basis(Z, S, blocks, n)
    assert_close(full_up @ full_down, Z, atol=1e-9)


def test_output_fit_gta_runs_and_bad_fit_options_raise():
    m = _model(_spec(h_kv=2))
    tok = _tokens()
    out = gqa_to_gta(m, _moments(m, n=16), fit="output", progress=False)
    assert out.spec.row_dim == 2 * 16 + 8
    with torch.no_grad():
        assert torch.isfinite(out(tok)).all()
    with pytest.raises(ValueError, match="needs state='joint'"):
        gqa_to_gta(m, _moments(m), fit="output", state="key", progress=False)
    with pytest.raises(ValueError, match="fit must be one of"):
        gqa_to_mla(m, _moments(m), kv_lora_rank=8, rope_dim=16, fit="whiten", progress=False)
    with pytest.raises(ValueError, match="does not apply to method='mha2mla'"):
        gqa_to_mla(m, _moments(m), kv_lora_rank=8, rope_dim=16, fit="output", method="mha2mla", progress=False)
    with pytest.raises(ValueError, match="--fit output applies to mla, gla and gta"):
        check_conversion(m.spec, "gqa", kv_heads=1, fit="output")
