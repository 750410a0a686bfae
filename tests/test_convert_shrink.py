"""Covariance shrinkage of the calibration moments (``calib_shrinkage``, calib.py ``shrink_moment``): λ = 0 is
the unshrunk fit bit for bit, any λ < 1 keeps full-rank fits exact, the mean is kept, and bad values are refused
naming the field."""

import math

import pytest
import torch
from test_convert import _model, _moments, _rank1_keys, _spec, _tokens
from test_qknorm import EXACT
from test_qknorm import _source as _qk_source

from kvslim.convert import convert_model, gqa_to_mla, max_latent_dim
from kvslim.convert.calib import QKNormMoment, check_shrinkage, shrink_moment
from kvslim.convert.pipeline import check_conversion
from kvslim.testing import assert_close


def test_shrink_moment_keeps_the_mean_and_moves_the_covariance_toward_a_scaled_identity():
    m = _model(_spec(h_kv=2, bias=True))
    S = _moments(m)[0]
    assert shrink_moment(S, 0) is S and shrink_moment(S, 0.0) is S
    mu = S[:-1, -1]
    C = S[:-1, :-1] - torch.outer(mu, mu)
    D = C.shape[0]
    for lam in (0.05, 0.5, 0.999):
        T = shrink_moment(S, lam)
        assert_close(T[:-1, -1], S[:-1, -1], atol=0, rtol=0)  # mean and constant coordinate untouched
        assert_close(T[-1], S[-1], atol=0, rtol=0)
        C2 = T[:-1, :-1] - torch.outer(mu, mu)
        assert_close(C2, (1 - lam) * C + lam * torch.trace(C) / D * torch.eye(D, dtype=C.dtype), atol=1e-12)
        assert math.isclose(float(torch.trace(C2)), float(torch.trace(C)), rel_tol=1e-12)  # same total variance
        ev = torch.linalg.eigvalsh(C2)
        assert float(ev.min()) >= lam * float(torch.trace(C)) / D * (1 - 1e-9)  # well conditioned
        cond = lambda e: float(e.max() / e.min())  # noqa: E731
        assert cond(ev) < cond(torch.linalg.eigvalsh(C))  # better conditioned than the raw covariance


def test_shrink_to_diagonal_keeps_each_channel_variance():
    m = _model(_spec(h_kv=2, bias=True))
    S = _moments(m)[0]
    assert shrink_moment(S, 0, "diagonal") is S
    mu = S[:-1, -1]
    C = S[:-1, :-1] - torch.outer(mu, mu)
    T = shrink_moment(S, 0.4, "diagonal")
    C2 = T[:-1, :-1] - torch.outer(mu, mu)
    assert_close(C2.diagonal(), C.diagonal(), atol=1e-12)
    off = ~torch.eye(C.shape[0], dtype=torch.bool)
    assert_close(C2[off], 0.6 * C[off], atol=1e-12)
    assert_close(T[:, -1], S[:, -1], atol=0, rtol=0)
    assert not torch.allclose(T, shrink_moment(S, 0.4, "identity"))


def test_shrink_qk_norm_moment():
    m = _qk_source()
    mom = _moments(m)[0]
    assert isinstance(mom, QKNormMoment)
    out = shrink_moment(mom, 0.2)
    assert_close(out.kv, shrink_moment(mom.kv, 0.2), atol=0, rtol=0)
    d = mom.q.shape[-1]
    for h in range(mom.q.shape[0]):
        q = mom.q[h]
        assert_close(out.q[h], 0.8 * q + 0.2 * torch.trace(q) / d * torch.eye(d, dtype=q.dtype), atol=1e-12)


@pytest.mark.parametrize("to,kw", [("mla", {}), ("gla", dict(latent_heads=2)), ("qk-mla", {})])
def test_shrinkage_keeps_full_rank_fits_exact(to, kw):
    qk = to.startswith("qk")
    m = _qk_source(same_keys=True) if qk else _rank1_keys(_model(_spec(h_kv=2)))
    h_c = kw.get("latent_heads", 1)
    full = max_latent_dim(m.spec, h_c, 16)
    tok = _tokens()
    with torch.no_grad():
        ref = m(tok)
        for fit in ("bkv", "output"):
            for shrink_to in ("identity", "diagonal"):
                out, _ = convert_model(m, "gla" if to == "gla" else "mla", moments=_moments(m), kv_lora_rank=full,
                                       rope_dim=16, fit=fit, calib_shrinkage=0.5, calib_shrink_to=shrink_to,
                                       progress=False, **kw)
                assert_close(out(tok), ref, atol=EXACT if qk else 1e-7, rtol=0)


def test_shrinkage_zero_is_the_default_and_nonzero_changes_a_low_rank_fit():
    m = _model(_spec(h_kv=2))
    mom, tok = _moments(m, n=16), _tokens()
    with torch.no_grad():
        plain = gqa_to_mla(m, mom, kv_lora_rank=8, rope_dim=16, fit="output", progress=False)(tok)
        for to, kw in (("mla", dict(kv_lora_rank=8, rope_dim=16)), ("gta", {})):
            base, _ = convert_model(m, to, moments=mom, fit="output", progress=False, **kw)
            zero, _ = convert_model(m, to, moments=mom, fit="output", calib_shrinkage=0.0, progress=False, **kw)
            shrunk, _ = convert_model(m, to, moments=mom, fit="output", calib_shrinkage=0.3, progress=False, **kw)
            assert torch.equal(base(tok), zero(tok))
            assert (base(tok) - shrunk(tok)).abs().max() > 1e-6
            if to == "mla":
                assert torch.equal(base(tok), plain)
        # the sequential pass shrinks each layer's moment too
        calib = torch.randint(0, 97, (4, 24), generator=torch.Generator().manual_seed(1))
        seq = [convert_model(m, "mla", calib=calib, kv_lora_rank=8, rope_dim=16, fit="output", calib_pass="sequential",
                             calib_shrinkage=lam, progress=False)[0](tok) for lam in (0.0, 0.3)]
        assert (seq[0] - seq[1]).abs().max() > 1e-6


@pytest.mark.parametrize("bad", [-0.1, 1.0, 1.5, float("nan"), True, "0.1", None])
def test_bad_shrinkage_raises_naming_the_field(bad):
    with pytest.raises(ValueError, match="calib_shrinkage"):
        check_shrinkage(bad)
    m = _model(_spec(h_kv=2))
    with pytest.raises(ValueError, match="calib_shrinkage"):
        check_conversion(m.spec, "mla", kv_lora_rank=8, rope_dim=16, calib_shrinkage=bad)
    with pytest.raises(ValueError, match="calib_shrinkage"):
        convert_model(m, "gta", moments=_moments(m), calib_shrinkage=bad, progress=False)


@pytest.mark.parametrize("bad", ["diag", "", None, 0])
def test_bad_shrink_target_raises_naming_the_field(bad):
    m = _model(_spec(h_kv=2))
    with pytest.raises(ValueError, match="calib_shrink_to"):
        check_conversion(m.spec, "mla", kv_lora_rank=8, rope_dim=16, calib_shrinkage=0.1, calib_shrink_to=bad)
    with pytest.raises(ValueError, match="calib_shrink_to"):
        shrink_moment(_moments(m)[0], 0.1, bad)


def test_shrinkage_with_gqa_target_raises():
    m = _model(_spec(h_kv=2))
    with pytest.raises(ValueError, match="calib_shrinkage applies to mla, gla and gta"):
        check_conversion(m.spec, "gqa", kv_heads=1, calib_shrinkage=0.1)
    check_conversion(m.spec, "gqa", kv_heads=1, calib_shrinkage=0.0)
