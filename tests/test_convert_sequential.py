"""Sequential calibration (``calib_pass="sequential"``, kvslim/convert/sequential.py): layer i is fit on the
activations of the converted layers 0..i-1.

At full rank it is exact, as the original pass is; streaming and in-memory sequential conversions are byte-
identical; the moments it fits on are the converted model's own (so at low rank they differ from the source's
after layer 0); bad values are refused naming the field."""

import pytest
import torch
from test_convert import VOCAB, _rank1_keys, _spec, _tokens
from test_convert_stream import sources  # noqa: F401 - a fixture

import kvslim.convert.pipeline as pipeline
from kvslim.checkpoint import STAMP
from kvslim.convert import attention_input_moments, convert_checkpoint, max_latent_dim
from kvslim.convert.pipeline import convert_model
from kvslim.testing import assert_close, tiny_model


def _deep(spec, layers=3):
    return tiny_model(spec, vocab=VOCAB, layers=layers).double()


def _calib(n=6, t=24, seed=1):
    return torch.randint(0, VOCAB, (n, t), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("to,fit", [("mla", "bkv"), ("mla", "output"), ("gla", "bkv"), ("gla", "output")])
def test_full_rank_sequential_is_exact_like_original(to, fit):
    m = _rank1_keys(_deep(_spec(h_kv=2)))  # RoPE then drops nothing: full rank is exact
    h_c = 1 if to == "mla" else 2
    opts = dict(kv_lora_rank=max_latent_dim(m.spec, h_c, 16), rope_dim=16, fit=fit,
                **({"latent_heads": h_c} if to == "gla" else {}))
    tok = _tokens()
    with torch.no_grad():
        ref = m(tok)
        got = {p: convert_model(m, to, calib=_calib(), calib_pass=p, progress=False, **opts)[0](tok)
               for p in ("original", "sequential")}
    assert_close(got["sequential"], ref, atol=1e-7)
    assert_close(got["sequential"], got["original"], atol=1e-7)


CASES = [  # (source, to, options): every target, both fits, DeepSeek and kvslim formats, biases, per-layer ranks
    ("hf", "mla", dict(kv_lora_rank=16, rope_dim=8)),
    ("hf", "mla", dict(kv_lora_rank=12, rope_dim=8, fit="output", fmt="kvslim", dtype="bfloat16")),
    ("hf", "gla", dict(latent_heads=3, kv_lora_rank=8, rope_dim=8, fit="output")),
    ("hf", "gta", dict(fit="output")),
    ("hf", "gta", dict(fmt="deepseek")),
    ("qwen", "mla", dict(kv_lora_rank=16, rope_dim=8, fmt="kvslim")),
    ("hf", "mla", dict(kv_lora_rank=32, rope_dim=8, fit="output", rank_alloc="relative")),
]


@pytest.mark.parametrize("source,to,opts", CASES, ids=[f"{s}-{t}-{i}" for i, (s, t, _) in enumerate(CASES)])
def test_sequential_streaming_is_byte_identical_to_in_memory(sources, tmp_path, source, to, opts):  # noqa: F811
    calib = torch.randint(0, 97, (6, 24), generator=torch.Generator().manual_seed(1))  # 2 batches of 4, ragged
    res = {}
    for name, kw in (("mem", dict(stream=False, calib_pass="sequential")), ("stream", dict(calib_pass="sequential")),
                     ("orig", dict())):
        res[name] = convert_checkpoint(model_dir=sources[source], out=tmp_path / name, to=to, calib_tokens=calib,
                                       progress=False, **kw, **opts)
    a, b = tmp_path / "mem", tmp_path / "stream"
    assert sorted(p.name for p in a.iterdir()) == sorted(p.name for p in b.iterdir())
    for f in a.iterdir():
        if f.name != STAMP:
            assert (b / f.name).read_bytes() == f.read_bytes(), f.name
    assert res["stream"].stats == res["mem"].stats and res["stream"].export == res["mem"].export
    assert res["stream"].target == res["mem"].target and res["stream"].layer_ranks == res["mem"].layer_ranks
    # and it is not the original pass (lossy ranks: layers >= 1 see other activations)
    weights = (tmp_path / "orig" / "model.safetensors").read_bytes()
    assert (b / "model.safetensors").read_bytes() != weights


@pytest.mark.parametrize("to,opts", [("mla", dict(kv_lora_rank=8, rope_dim=16, fit="output")),
                                     ("mla", dict(kv_lora_rank=8, rope_dim=16)),
                                     ("gla", dict(latent_heads=2, kv_lora_rank=6, rope_dim=16, fit="output")),
                                     ("gta", dict(fit="output"))])
def test_sequential_fits_each_layer_on_the_converted_layers_activations(monkeypatch, to, opts):
    m, calib = _deep(_spec(h_kv=2)), _calib()
    seen = []
    run = pipeline._run

    def spy(model, to, moments, **kw):
        seen.append(moments[0].clone())
        return run(model, to, moments, **kw)

    monkeypatch.setattr(pipeline, "_run", spy)
    out, _ = convert_model(m, to, calib=calib, calib_pass="sequential", progress=False, **opts)
    source = attention_input_moments(m, calib, progress=False)
    own = attention_input_moments(out, calib, progress=False)  # what the converted model feeds each layer
    assert len(seen) == m.config.num_layers
    assert_close(seen[0], source[0], atol=1e-12)  # layer 0 reads the embeddings either way
    for i in range(1, len(seen)):
        assert_close(seen[i], own[i], atol=1e-10, msg=f"layer {i}")
        rel = float((seen[i] - source[i]).norm() / source[i].norm())
        assert rel > 1e-3, f"layer {i}: the sequential moment is the source's (relative difference {rel:.1e})"
    monkeypatch.setattr(pipeline, "_run", run)
    orig, _ = convert_model(m, to, calib=calib, progress=False, **opts)
    tok = _tokens()
    with torch.no_grad():
        assert (out(tok) - orig(tok)).abs().max() > 1e-6


def test_bad_calib_pass_is_named(sources, tmp_path):  # noqa: F811
    m, calib = _deep(_spec(h_kv=2), layers=2), _calib()
    kw = dict(kv_lora_rank=8, rope_dim=16, progress=False)
    with pytest.raises(ValueError, match=r"calib_pass must be one of \('original', 'sequential'\), got 'bogus'"):
        convert_model(m, "mla", calib=calib, calib_pass="bogus", **kw)
    with pytest.raises(ValueError, match="moments: calib_pass='sequential'"):
        convert_model(m, "mla", moments=attention_input_moments(m, calib, progress=False), calib_pass="sequential",
                      **kw)
    with pytest.raises(ValueError, match="needs calibration tokens"):
        convert_model(m, "mla", calib_pass="sequential", **kw)
    with pytest.raises(ValueError, match="calib_pass='sequential' applies to mla, gla and gta"):
        convert_model(m, "gqa", kv_heads=1, calib_pass="sequential", progress=False)
    with pytest.raises(ValueError, match="calib_pass must be one of"):  # before anything is read or written
        convert_checkpoint(model_dir=sources["hf"], out=tmp_path / "o", to="mla", kv_lora_rank=16, rope_dim=8,
                           calib_tokens=calib, calib_pass="Sequential", progress=False)
    assert not (tmp_path / "o").exists()


def test_cli_calib_pass(sources, tmp_path, capsys, convert_kwargs):  # noqa: F811
    from kvslim.cli import main

    args = ["convert", "--model", str(sources["hf"]), "--to", "mla", "--kv-lora-rank", "16", "--rope-dim", "8",
            "--out", str(tmp_path / "o")]
    with pytest.raises(SystemExit) as e:
        main([*args, "--calib-pass", "backwards"])
    assert e.value.code == 2 and "--calib-pass" in capsys.readouterr().err
    for flag, want in (([], "original"), (["--calib-pass", "sequential"], "sequential")):
        assert main([*args, *flag]) == 2
        assert convert_kwargs["calib_pass"] == want
