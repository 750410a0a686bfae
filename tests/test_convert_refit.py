"""Layer-wise refit (kvslim/convert/refit.py): Adam steps matching each converted attention layer's output to the
source layer's on the calibration windows.

It lowers every layer's output error on the calibration windows (and never raises it: the best parameters are
kept, so a diverging step size leaves the closed-form fit untouched and an exact conversion stays exact);
streaming and in-memory refits are byte-identical; with ``freqfold="auto"`` the group is chosen first; bad
values are refused naming the field, before anything is written."""

import math

import pytest
import torch
from test_convert import VOCAB, _rank1_keys, _spec, _tokens
from test_convert_stream import sources  # noqa: F401 - a fixture

from kvslim.checkpoint import STAMP
from kvslim.convert import attention_input_moments, convert_checkpoint, max_latent_dim
from kvslim.convert.pipeline import convert_model
from kvslim.convert.refit import REFIT_STEPS_CLI, refit_attention
from kvslim.testing import assert_close, tiny_model


def _deep(spec, layers=3):
    return tiny_model(spec, vocab=VOCAB, layers=layers).double()


def _calib(n=6, t=24, seed=1):
    return torch.randint(0, VOCAB, (n, t), generator=torch.Generator().manual_seed(seed))


TARGETS = [("mla", dict(kv_lora_rank=8, rope_dim=16, fit="output")),
           ("gla", dict(latent_heads=2, kv_lora_rank=6, rope_dim=16, fit="output")),
           ("gta", dict(fit="output")),
           ("gta", dict(calib_pass="sequential"))]


def _layer_errors(source, conv, calib) -> list[float]:
    """Relative attention-output error of every converted layer on its calibration inputs (source activations)."""
    errs = []
    with torch.no_grad():
        h = source.model.embed_tokens(calib)
        pos = torch.arange(calib.shape[1]).expand(*calib.shape)
        for ls, lc in zip(source.model.layers, conv.model.layers):
            want = ls.self_attn(ls.input_layernorm(h), pos, None)
            got = lc.self_attn(lc.input_layernorm(h), pos, None)
            errs.append(float((got - want).pow(2).sum() / want.pow(2).sum()))
            h = ls(h, pos, None)
    return errs


@pytest.mark.parametrize("to,opts", TARGETS, ids=[f"{t}-{i}" for i, (t, _) in enumerate(TARGETS)])
def test_refit_lowers_every_layers_output_error(to, opts):
    m, calib = _deep(_spec(h_kv=2)), _calib()
    base, _ = convert_model(m, to, calib=calib, progress=False, **opts)
    out, stats = convert_model(m, to, calib=calib, progress=False, refit_steps=24, **opts)
    assert out.spec == base.spec  # the same cache: refit changes weights, not the target
    err = stats["refit_error"]
    assert len(err) == m.config.num_layers
    for i, (before, after) in enumerate(err):
        assert after < 0.9 * before, f"layer {i}: {before:.3g} -> {after:.3g}"
    if opts.get("calib_pass") != "sequential":  # the stats are measured on the inputs the layer was refit on
        assert_close(torch.tensor([e[1] for e in err]), torch.tensor(_layer_errors(m, out, calib)), rtol=1e-6)
        assert_close(torch.tensor([e[0] for e in err]), torch.tensor(_layer_errors(m, base, calib)), rtol=1e-6)
    with torch.no_grad():  # and only attention changed
        for a, b in zip(out.model.layers, base.model.layers):
            assert_close(a.mlp.gate_proj.weight, b.mlp.gate_proj.weight, atol=0)
            assert not torch.equal(a.self_attn.o_proj.weight, b.self_attn.o_proj.weight)


def test_a_diverging_refit_keeps_the_closed_form_fit():
    m, calib = _deep(_spec(h_kv=2), layers=2), _calib()
    opts = dict(kv_lora_rank=8, rope_dim=16, fit="output")
    base, _ = convert_model(m, "mla", calib=calib, progress=False, **opts)
    out, stats = convert_model(m, "mla", calib=calib, progress=False, refit_steps=4, refit_lr=50.0, **opts)
    for before, after in stats["refit_error"]:
        assert after == before
    for (n, a), b in zip(out.state_dict().items(), base.state_dict().values()):
        assert torch.equal(a, b), n
        assert not a.requires_grad


def test_refit_of_an_exact_conversion_stays_exact():
    m = _rank1_keys(_deep(_spec(h_kv=2)))  # RoPE drops nothing: the full-rank conversion is exact
    opts = dict(kv_lora_rank=max_latent_dim(m.spec, 1, 16), rope_dim=16)
    tok = _tokens()
    out, stats = convert_model(m, "mla", calib=_calib(), progress=False, refit_steps=8, **opts)
    with torch.no_grad():
        assert_close(out(tok), m(tok), atol=1e-7)
    assert all(after <= before < 1e-12 for before, after in stats["refit_error"])


def test_refit_attention_leaves_its_inputs_and_the_source_alone():
    m, calib = _deep(_spec(h_kv=2), layers=1), _calib()
    conv, _ = convert_model(m, "gta", calib=calib, progress=False)
    h = [m.model.embed_tokens(calib[:4]).detach(), m.model.embed_tokens(calib[4:]).detach()]
    keep = [x.clone() for x in h]
    src = {k: v.clone() for k, v in m.state_dict().items()}
    assert refit_attention(m.model.layers[0], conv.model.layers[0], h, steps=0) == {}
    st = refit_attention(m.model.layers[0], conv.model.layers[0], h, steps=5)
    assert st["refit_error"][1] < st["refit_error"][0]
    assert all(torch.equal(a, b) for a, b in zip(h, keep))
    assert all(torch.equal(v, src[k]) for k, v in m.state_dict().items())


CASES = [("hf", "mla", dict(kv_lora_rank=16, rope_dim=8)),  # DeepSeek export
         ("hf", "gta", dict(fit="output", calib_pass="sequential")),
         ("qwen", "gla", dict(latent_heads=1, kv_lora_rank=8, rope_dim=8, fmt="kvslim", freqfold="auto"))]


@pytest.mark.parametrize("source,to,opts", CASES, ids=[f"{s}-{t}-{i}" for i, (s, t, _) in enumerate(CASES)])
def test_refit_streaming_is_byte_identical_to_in_memory(sources, tmp_path, source, to, opts):  # noqa: F811
    calib = torch.randint(0, 97, (6, 24), generator=torch.Generator().manual_seed(1))
    extra = {}
    if opts.get("freqfold") == "auto":
        extra["select_tokens"] = torch.randint(0, 97, (4, 24), generator=torch.Generator().manual_seed(2))
    res = {}
    for name, kw in (("mem", dict(stream=False, refit_steps=6)), ("stream", dict(refit_steps=6)), ("plain", {})):
        res[name] = convert_checkpoint(model_dir=sources[source], out=tmp_path / name, to=to, calib_tokens=calib,
                                       progress=False, **kw, **opts, **extra)
    a, b = tmp_path / "mem", tmp_path / "stream"
    for f in a.iterdir():
        if f.name != STAMP:
            assert (b / f.name).read_bytes() == f.read_bytes(), f.name
    sel = {k: r.stats.pop("freqfold_select", None) for k, r in res.items()}  # scores equal to float rounding
    assert res["stream"].stats == res["mem"].stats
    assert len(res["stream"].stats["refit_error"]) == res["stream"].num_layers
    assert all(after < before for before, after in res["stream"].stats["refit_error"])
    if "select_tokens" in extra:  # the group is chosen on the closed-form fits, then refit
        for k in ("mem", "stream"):
            assert sel[k]["chosen"] == sel["plain"]["chosen"]
            assert sel[k]["ppl"] == pytest.approx(sel["plain"]["ppl"], rel=1e-5)
    assert (b / "model.safetensors").read_bytes() != (tmp_path / "plain" / "model.safetensors").read_bytes()


def test_bad_refit_values_are_named(sources, tmp_path):  # noqa: F811
    m, calib = _deep(_spec(h_kv=2), layers=2), _calib()
    kw = dict(kv_lora_rank=8, rope_dim=16, progress=False)
    for bad in (-1, 1.5, True, "8"):
        with pytest.raises(ValueError, match=r"refit_steps must be an int >= 0, got"):
            convert_model(m, "mla", calib=calib, refit_steps=bad, **kw)
    for bad in (0, -1e-3, math.nan, math.inf):
        with pytest.raises(ValueError, match=r"refit_lr must be a finite number > 0, got"):
            convert_model(m, "mla", calib=calib, refit_steps=2, refit_lr=bad, **kw)
    with pytest.raises(ValueError, match="refit_steps applies to mla, gla and gta"):
        convert_model(m, "gqa", kv_heads=1, refit_steps=2, progress=False)
    with pytest.raises(ValueError, match="refit_steps: the refit reads the calibration windows"):
        convert_model(m, "mla", moments=attention_input_moments(m, calib, progress=False), refit_steps=2, **kw)
    with pytest.raises(ValueError, match="refit_steps must be"):  # before anything is read or written
        convert_checkpoint(model_dir=sources["hf"], out=tmp_path / "o", to="mla", kv_lora_rank=16, rope_dim=8,
                           calib_tokens=calib, refit_steps=-2, progress=False)
    assert not (tmp_path / "o").exists()


def test_cli_refit_steps(sources, tmp_path, capsys, convert_kwargs):  # noqa: F811
    from kvslim.cli import main

    args = ["convert", "--model", str(sources["hf"]), "--kv-lora-rank", "16", "--rope-dim", "8",
            "--out", str(tmp_path / "o")]
    for to, flag, want in (("mla", [], REFIT_STEPS_CLI), ("gta", ["--refit-steps", "0"], 0), ("gqa", [], 0),
                           ("gla", ["--refit-steps", "7", "--refit-lr", "1e-3"], 7)):
        assert main([*args, "--to", to, *flag]) == 2
        assert convert_kwargs["refit_steps"] == want
    assert convert_kwargs["refit_lr"] == 1e-3


def test_cli_prints_the_refit(tmp_path, capsys, monkeypatch):
    from kvslim.cli import main
    from kvslim.convert import ConvertResult

    spec = _spec(h_kv=2)
    res = ConvertResult(source=spec, target=spec, num_layers=2, out=tmp_path / "o",
                        stats={"refit_error": [(0.5, 0.1), (0.3, 0.2)]})
    monkeypatch.setattr("kvslim.convert.convert_checkpoint", lambda **kw: res)
    assert main(["convert", "--model", str(tmp_path), "--to", "gta", "--out", str(tmp_path / "o")]) == 0
    assert ("refit: relative attention-output error on the calibration windows, mean over 2 layers: 0.4000 -> "
            "0.1500") in capsys.readouterr().out


def test_refit_on_a_device_runs_on_copies_and_equals_the_in_place_refit():
    """``device`` set: the refit runs on copies of both layers and the inputs, then the weights come back.
    On the layers' own device (the only one CI has) it equals the in-place refit bit for bit."""
    m, calib = _deep(_spec(h_kv=2), layers=1), _calib()
    conv, _ = convert_model(m, "mla", calib=calib, progress=False, kv_lora_rank=8, rope_dim=16, fit="output")
    twin = {k: v.clone() for k, v in conv.state_dict().items()}
    h = [m.model.embed_tokens(calib[:4]).detach(), m.model.embed_tokens(calib[4:]).detach()]
    src = {k: v.clone() for k, v in m.state_dict().items()}
    flags = [p.requires_grad for p in conv.parameters()]
    a = refit_attention(m.model.layers[0], conv.model.layers[0], h, steps=5, device="cpu")
    away = conv.state_dict()
    conv.load_state_dict(twin)
    b = refit_attention(m.model.layers[0], conv.model.layers[0], h, steps=5)
    assert a == b and a["refit_error"][1] < a["refit_error"][0]
    for k, v in conv.state_dict().items():
        assert torch.equal(away[k], v), k
    assert all(torch.equal(v, src[k]) for k, v in m.state_dict().items())
    assert [p.requires_grad for p in conv.parameters()] == flags


def test_refit_device_is_checked_by_name(sources, tmp_path, monkeypatch):  # noqa: F811
    from kvslim.convert.refit import refit_device

    assert refit_device(None) is None and refit_device("cpu") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    assert refit_device("auto") == torch.device("cpu")
    m, calib = _deep(_spec(h_kv=2), layers=1), _calib()
    for bad, msg in (("cuda", "refit_device 'cuda': this machine has 0 CUDA device"),
                     ("gpu0", "refit_device must be 'auto' or a torch device"),
                     ("meta", "refit_device must be a cpu or cuda device")):
        with pytest.raises(ValueError, match=msg):
            convert_model(m, "mla", calib=calib, kv_lora_rank=8, rope_dim=16, refit_steps=2, refit_device=bad,
                          progress=False)
        with pytest.raises(ValueError, match=msg):  # before anything is read or written
            convert_checkpoint(model_dir=sources["hf"], out=tmp_path / "o", to="mla", kv_lora_rank=16, rope_dim=8,
                               calib_tokens=calib, refit_steps=2, refit_device=bad, progress=False)
        assert not (tmp_path / "o").exists()


def test_cli_refit_device(sources, tmp_path, convert_kwargs):  # noqa: F811
    from kvslim.cli import main

    args = ["convert", "--model", str(sources["hf"]), "--to", "mla", "--kv-lora-rank", "16", "--rope-dim", "8",
            "--out", str(tmp_path / "o")]
    assert main(args) == 2
    assert convert_kwargs["refit_device"] == "auto"
    assert main([*args, "--refit-device", "cpu"]) == 2
    assert convert_kwargs["refit_device"] == "cpu"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_refit_on_cuda_matches_the_cpu_refit():
    """On a GPU the same steps give about the same fit (fp32 on both; Adam's sign-like steps amplify rounding in
    near-zero gradients, so the weights are not compared element by element)."""
    m, calib = tiny_model(_spec(h_kv=2), vocab=VOCAB, layers=1).float(), _calib()
    conv, _ = convert_model(m, "gla", calib=calib, progress=False, latent_heads=2, kv_lora_rank=6, rope_dim=16)
    twin = {k: v.clone() for k, v in conv.state_dict().items()}
    h = [m.model.embed_tokens(calib).detach()]
    gpu = refit_attention(m.model.layers[0], conv.model.layers[0], h, steps=8, device="cuda")
    assert next(conv.parameters()).device.type == "cpu" and next(m.parameters()).device.type == "cpu"
    assert any(not torch.equal(twin[k], v) for k, v in conv.state_dict().items())  # the weights came back
    conv.load_state_dict(twin)
    cpu = refit_attention(m.model.layers[0], conv.model.layers[0], h, steps=8)
    assert gpu["refit_error"][0] == pytest.approx(cpu["refit_error"][0], rel=1e-4)
    assert gpu["refit_error"][1] == pytest.approx(cpu["refit_error"][1], rel=5e-2)
    assert gpu["refit_error"][1] < 0.9 * gpu["refit_error"][0]


def test_refit_step_size_decays_along_a_cosine():
    from kvslim.convert.refit import _lr_factor

    f = [_lr_factor(s, 16) for s in range(16)]
    assert f[0] == 1.0 and f[8] == pytest.approx(0.5) and 0 < f[-1] < 0.01
    assert all(a > b for a, b in zip(f, f[1:]))
