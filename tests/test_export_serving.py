"""Serving-safe DeepSeek-V3 export (issues 16.6, 18): one checkpoint computed alike by transformers, vLLM, SGLang.

Each consumer is checked against the converted kvslim model on tiny random GQA sources
(tied and untied embeddings, rms_norm_eps 1e-5 so the eps rescaling is exercised) converted
to MLA, GLA and GTA:

* transformers: its own ``DeepseekV3ForCausalLM``;
* vLLM and SGLang: :func:`deepseek_reference`, a plain-torch DeepSeek MLA forward written from
  their model code (vLLM 0.32 ``deepseek_v2.py``, SGLang 0.5 ``deepseek_v2.py``), reading the
  files directly: ``kv_a_layernorm`` with ``eps = config.rms_norm_eps``; RoPE always interleaved
  (vLLM: ``is_neox_style=False``) or as ``rope_interleave`` says (SGLang); ``lm_head`` read from
  the file, never tied (vLLM) or tied as the config says (SGLang); vLLM's head-size rule;
* kvslim's own reader.

Also: the exactly linear latent norm at its worst-case input, fp16 representability, biases
(exported where they cancel, refused where they do not) and refusals that write nothing.
The real vLLM run is tests/vllm/ (scripts/test_vllm.sh).
"""

import functools
import json
import math
import os

import pytest
import torch
from safetensors.torch import load_file

from kvslim.convert import as_mla, attention_input_moments, convert_checkpoint, convert_model, save_deepseek
from kvslim.convert.deepseek import LATENT_NORM_EPS
from kvslim.model import Transformer
from kvslim.serving import VLLM_MLA_HEAD_SIZES, mla_layout
from kvslim.spec import AttentionSpec
from kvslim.testing import assert_close, tiny_model

VOCAB = 97
KINDS = {"mla": dict(kv_lora_rank=20, rope_dim=8, freqfold=2), "gla": dict(latent_heads=2, kv_lora_rank=12, rope_dim=8),
         "gta": {}}


def _source(tie=False, rope_dim=None, bias=False, seed=0):
    spec = AttentionSpec(kind="gqa", hidden_size=64, num_heads=4, head_dim=16, num_kv_heads=2, rope_dim=rope_dim,
                         rope_theta=1e4, qkv_bias=bias)
    m = tiny_model(spec, vocab=VOCAB, tie=tie, seed=seed).double()
    with torch.no_grad():  # scores of O(1), so RoPE and scale mistakes show in the logits
        for layer in m.model.layers:
            layer.self_attn.q_proj.weight.mul_(6)
            layer.self_attn.k_proj.weight.mul_(6)
    return m


def _moments(m):
    g = torch.Generator().manual_seed(1)
    return attention_input_moments(m, torch.randint(0, VOCAB, (8, 24), generator=g), progress=False)


@functools.cache
def _convert(kind, tie=False):
    """The converted tiny model (cached: the tests only read it)."""
    src = _source(tie=tie)
    return convert_model(src, kind, moments=_moments(src), progress=False, **KINDS[kind])[0]


def _tokens(b=2, t=14):
    return torch.randint(0, VOCAB, (b, t), generator=torch.Generator().manual_seed(2))


def _rms(x, w, eps):
    return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def _rope(x, pos, theta, interleave):
    """``x [T, ..., d]`` rotated at positions ``pos [T]``; interleaved (GPT-J) or rotate_half (NeoX) pairs."""
    d = x.shape[-1]
    ang = pos[:, None].double() * (1.0 / theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d))[None]
    cos, sin = (f(ang).view(ang.shape[0], *([1] * (x.dim() - 2)), d // 2) for f in (torch.cos, torch.sin))
    if interleave:
        x1, x2 = x[..., 0::2], x[..., 1::2]
        return torch.stack([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1).flatten(-2)
    x1, x2 = x[..., : d // 2], x[..., d // 2:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1)


def deepseek_reference(path, tokens, server: str) -> torch.Tensor:
    """Logits ``[B, T, V]`` of a DeepSeek-V3 dense MLA directory as ``server`` (vllm | sglang) computes them."""
    cfg = json.loads((path / "config.json").read_text())
    sd = {k: v.double() for k, v in load_file(path / "model.safetensors").items()}
    r, d_r, d_n, d_v = cfg["kv_lora_rank"], cfg["qk_rope_head_dim"], cfg["qk_nope_head_dim"], cfg["v_head_dim"]
    H, eps, theta = cfg["num_attention_heads"], cfg["rms_norm_eps"], cfg["rope_parameters"]["rope_theta"]
    assert cfg["rope_parameters"]["rope_type"] == "default" and cfg["q_lora_rank"] is None
    assert cfg["first_k_dense_replace"] == cfg["num_hidden_layers"] and isinstance(cfg["n_routed_experts"], int)
    if server == "vllm":
        assert r + d_r in VLLM_MLA_HEAD_SIZES, f"vLLM's MLA backends refuse head size {r + d_r}"
        interleave, tie = True, False  # is_neox_style=False always; ParallelLMHead never tied
    else:
        interleave, tie = cfg.get("rope_interleave", True), cfg.get("tie_word_embeddings", False)
    lm_head = sd["model.embed_tokens.weight"] if tie else sd["lm_head.weight"]  # vLLM: missing = uninitialised
    out = []
    for seq in tokens:
        T = len(seq)
        pos = torch.arange(T)
        h = sd["model.embed_tokens.weight"][seq]
        for i in range(cfg["num_hidden_layers"]):
            p = f"model.layers.{i}."
            x = _rms(h, sd[p + "input_layernorm.weight"], eps)
            q = (x @ sd[p + "self_attn.q_proj.weight"].T).view(T, H, d_n + d_r)
            kv = x @ sd[p + "self_attn.kv_a_proj_with_mqa.weight"].T
            c = _rms(kv[:, :r], sd[p + "self_attn.kv_a_layernorm.weight"], eps)  # eps = config.rms_norm_eps
            k_pe = _rope(kv[:, r:], pos, theta, interleave)
            kvb = (c @ sd[p + "self_attn.kv_b_proj.weight"].T).view(T, H, d_n + d_v)
            q_pe = _rope(q[..., d_n:], pos, theta, interleave)
            s = torch.einsum("thd,shd->hts", q[..., :d_n], kvb[..., :d_n]) + torch.einsum("thd,sd->hts", q_pe, k_pe)
            s = (s * (d_n + d_r) ** -0.5).masked_fill(torch.ones(T, T).triu(1).bool(), -math.inf)
            o = torch.einsum("hts,shd->thd", s.softmax(-1), kvb[..., d_n:]).reshape(T, H * d_v)
            h = h + o @ sd[p + "self_attn.o_proj.weight"].T
            y = _rms(h, sd[p + "post_attention_layernorm.weight"], eps)
            gate, up = y @ sd[p + "mlp.gate_proj.weight"].T, y @ sd[p + "mlp.up_proj.weight"].T
            h = h + (torch.nn.functional.silu(gate) * up) @ sd[p + "mlp.down_proj.weight"].T
        out.append(_rms(h, sd["model.norm.weight"], eps) @ lm_head.T)
    return torch.stack(out)


@pytest.mark.parametrize("target", ["transformers", "vllm", "sglang"])
@pytest.mark.parametrize("tie", [False, True])
@pytest.mark.parametrize("kind", ["mla", "gla", "gta"])
def test_export_computes_alike_in_every_consumer(tmp_path, kind, tie, target):
    transformers = pytest.importorskip("transformers")
    model = _convert(kind, tie=tie)
    report = {}
    out = save_deepseek(model, tmp_path / "ds", target=target, report=report)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == "deepseek_v3" and cfg["rope_interleave"] is True
    assert cfg["tie_word_embeddings"] is False and "lm_head.weight" in load_file(out / "model.safetensors")
    assert cfg["rms_norm_eps"] == LATENT_NORM_EPS and report["residual_scale"] == pytest.approx(math.sqrt(0.1))
    lay = report["layout"]
    assert cfg["kv_lora_rank"] == lay.latent_dim and cfg["qk_rope_head_dim"] == lay.rope_dim
    if target == "vllm":
        assert lay.head_size == 320 and lay.rope_dim == 64 and report["cost"]["padding_elems"] > 0
    else:
        assert lay.padding == 0 and lay.latent_dim == lay.natural_latent
    tok = _tokens()
    with torch.no_grad():
        ref = model(tok)
        scale = float(ref.abs().max())
        hf = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
        assert_close(hf(tok).logits, ref, atol=1e-4 * scale, msg="transformers")
        assert_close(Transformer.from_pretrained(out)(tok), ref, atol=1e-4 * scale, msg="kvslim")
        servers = ["sglang"] + (["vllm"] if lay.head_size in VLLM_MLA_HEAD_SIZES else [])
        for server in servers:
            assert_close(deepseek_reference(out, tok, server), ref, atol=1e-4 * scale, msg=server)


def test_reference_detects_the_old_export_mistakes(tmp_path):
    """Reading the file with the conventions the old export assumed (rotate_half, latent eps = source eps) breaks it."""
    model = _convert("mla")
    out = save_deepseek(model, tmp_path / "ds", target="vllm")
    tok = _tokens()
    with torch.no_grad():
        ref = model(tok)
        assert_close(deepseek_reference(out, tok, "vllm"), ref, atol=1e-4 * float(ref.abs().max()))
        cfg = json.loads((out / "config.json").read_text())
        (out / "config.json").write_text(json.dumps({**cfg, "rope_interleave": False}))
        assert (deepseek_reference(out, tok, "sglang") - ref).abs().max() > 1e-2  # RoPE pairs matter
        (out / "config.json").write_text(json.dumps({**cfg, "rms_norm_eps": 1e-5}))
        assert (deepseek_reference(out, tok, "vllm") - ref).abs().max() > 1e-2  # the latent eps matters


@pytest.mark.parametrize("kind", ["mla", "gta"])
def test_latent_norm_is_linear_at_the_worst_input(kind):
    """At the input the bound allows to be largest (‖n‖² = D along W's top singular vector), the norm is c·(1 ± 2⁻²³)."""
    from kvslim.convert.deepseek import deepseek_state

    model = _convert(kind)
    sd, cfg, report = deepseek_state(model, target="vllm")
    nat = as_mla(model, report["layout"]).state_dict()
    r, r_nat, lam = cfg["kv_lora_rank"], report["layout"].natural_latent, report["residual_scale"]
    assert report["latent_norm_nonlinearity"] <= 2.0**-23
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        ln0, W0 = nat[p + "input_layernorm.weight"].double(), nat[p + "self_attn.kv_a_proj_with_mqa.weight"].double()
        _, _, vh = torch.linalg.svd(W0[:r_nat] * ln0[None])
        n = vh[0] * math.sqrt(ln0.numel())
        c = W0[:r_nat] @ (ln0 * n)
        x = sd[p + "input_layernorm.weight"] * n
        got = _rms(x @ sd[p + "self_attn.kv_a_proj_with_mqa.weight"][:r].T, sd[p + "self_attn.kv_a_layernorm.weight"],
                   LATENT_NORM_EPS)
        assert float((got[:r_nat] - c).norm() / c.norm()) <= 2.0**-23 and float(got[r_nat:].abs().max()) == 0.0
        w = sd[p + "self_attn.kv_a_layernorm.weight"]
        assert bool((w == w[0]).all()) and math.log2(float(w[0])).is_integer()  # a power of two: exact anywhere
    assert lam == pytest.approx(math.sqrt(LATENT_NORM_EPS / model.config.rms_norm_eps))


@pytest.mark.parametrize("kind", ["mla", "gla", "gta"])
def test_bf16_export_is_representable_in_fp16(tmp_path, kind):
    model = _convert(kind)
    report = {}
    out = save_deepseek(model, tmp_path / "ds", dtype=torch.bfloat16, target="vllm", report=report)
    assert report["fp16_ok"] and report["fp16_cast_error"] < 2.0**-9
    sd = load_file(out / "model.safetensors")
    for k, v in sd.items():
        assert v.dtype == torch.bfloat16 and bool(v.half().isfinite().all()), k
        assert float(v.float().abs().max()) <= 2.0**15, k
    bf16 = Transformer.from_pretrained(out, dtype=torch.float32)
    fp16 = Transformer.from_pretrained(out, dtype=torch.float32)
    with torch.no_grad():
        for p in fp16.parameters():
            p.copy_(p.half().float())  # fp16 storage, fp32 compute (as fp16 GGUF/ONNX consumers do)
        tok = _tokens()
        ref = bf16(tok)
        assert_close(fp16(tok), ref, atol=2e-4 * float(ref.abs().max()))


def _biased_source(k_bias_dims="nope", q_bias=False):
    """Partial RoPE (8 of 16 dims); a key bias in the non-rotary (or rotary) dims, q and v biases zero."""
    m = _source(rope_dim=8, bias=True)
    with torch.no_grad():
        for layer in m.model.layers:
            a = layer.self_attn
            a.v_proj.bias.zero_()
            a.q_proj.bias.copy_(torch.randn_like(a.q_proj.bias) if q_bias else torch.zeros_like(a.q_proj.bias))
            kb = torch.randn(2, 16, dtype=torch.float64)
            kb[:, :8 if k_bias_dims == "nope" else 16] = 0
            if k_bias_dims != "nope":
                kb[:, :8] = torch.randn(2, 8, dtype=torch.float64)
            a.k_proj.bias.copy_(kb.flatten())
    return m


def test_key_bias_that_cancels_is_exported_exactly(tmp_path):
    """A key bias only keys read adds q·b to every score of a query: constant, cancels in softmax."""
    src = _biased_source("nope")
    full = convert_model(src, "mla", moments=_moments(src), kv_lora_rank=56, rope_dim=8, progress=False)[0]
    out = save_deepseek(full, tmp_path / "ds", target="vllm")
    tok = _tokens()
    with torch.no_grad():
        ref = full(tok)
        assert_close(deepseek_reference(out, tok, "vllm"), ref, atol=1e-4 * float(ref.abs().max()))
        assert_close(Transformer.from_pretrained(out)(tok), ref, atol=1e-4 * float(ref.abs().max()))
    assert "kv_a_proj_with_mqa.bias" not in " ".join(load_file(out / "model.safetensors"))


@pytest.mark.parametrize("case,match", [
    ("low_rank", "reaches the values"),  # below full rank the PCA mixes the key bias into the values
    ("rope_bias", "RoPE key's bias"),
    ("q_bias", "query bias"),
    ("gta_bias", "reaches the values"),  # GTA's state is the value
])
def test_biases_that_do_not_cancel_are_refused(tmp_path, case, match):
    src = _biased_source("rope" if case == "rope_bias" else "nope", q_bias=case == "q_bias")
    if case == "gta_bias":
        model = convert_model(src, "gta", moments=_moments(src), progress=False)[0]
    else:
        rank = 20 if case == "low_rank" else 56
        model = convert_model(src, "mla", moments=_moments(src), kv_lora_rank=rank, rope_dim=8, progress=False)[0]
    with pytest.raises(ValueError, match=match):
        save_deepseek(model, tmp_path / "ds")
    assert os.listdir(tmp_path) == []


def test_refusals_name_the_reason_and_write_nothing(tmp_path):
    mla = _convert("mla")
    gqa = _source()
    cases = [
        (lambda: save_deepseek(mla, tmp_path / "o", target="vllm", head_size=400), r"320, 512, 576"),
        (lambda: save_deepseek(mla, tmp_path / "o", target="sglang", head_size=16), r"must be an int >= 28"),
        (lambda: save_deepseek(mla, tmp_path / "o", target="tgi"), "target must be one of"),
        (lambda: save_deepseek(gqa, tmp_path / "o"), "holds MLA, GLA or GTA"),
        (lambda: save_deepseek(mla, tmp_path / "o", dtype=torch.float16), "fp16 compute is not exact"),
    ]
    for fn, match in cases:
        with pytest.raises(ValueError, match=match):
            fn()
    yarn = AttentionSpec(kind="gta", hidden_size=64, num_heads=4, head_dim=16, num_kv_heads=2,
                         rope_scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32})
    with pytest.raises(ValueError, match="widening"):
        mla_layout(yarn, "vllm")
    normed = tiny_model(AttentionSpec(kind="mla", hidden_size=64, num_heads=4, head_dim=16, latent_dim=8, rope_dim=8),
                        vocab=VOCAB)
    with pytest.raises(ValueError, match="latent norm"):
        save_deepseek(normed, tmp_path / "o")
    assert os.listdir(tmp_path) == []


def test_as_mla_is_exact_with_padding_and_wider_rope():
    tok = _tokens()
    for kind in ("mla", "gla", "gta"):
        model = _convert(kind)
        for target, hs in (("vllm", 576), ("sglang", 100)):
            lay = mla_layout(model.spec, target, hs)
            with torch.no_grad():
                ref = model(tok)
                assert_close(as_mla(model, lay)(tok), ref, atol=1e-6 * float(ref.abs().max()), msg=f"{kind} {hs}")


def test_layouts_and_costs_for_smollm2_shapes():
    smol = dict(hidden_size=576, num_heads=9, head_dim=64, rope_theta=1e5)
    mla128 = AttentionSpec(kind="mla", latent_dim=128, rope_dim=64, latent_norm=False, **smol)
    mla192 = AttentionSpec(kind="mla", latent_dim=192, rope_dim=64, latent_norm=False, **smol)
    gla3 = AttentionSpec(kind="gla", num_latent_heads=3, latent_dim=64, rope_dim=64, latent_norm=False, **smol)
    gta3 = AttentionSpec(kind="gta", num_kv_heads=3, **smol)
    for spec, natural in ((mla128, 128), (mla192, 192), (gla3, 192), (gta3, 192)):
        assert mla_layout(spec, "transformers").latent_dim == natural
        lay = mla_layout(spec, "vllm")
        assert (lay.latent_dim, lay.rope_dim, lay.head_size, lay.natural_latent) == (256, 64, 320, natural)
        assert mla_layout(spec, "vllm", 576).latent_dim == 512
    c = mla_layout(gta3, "vllm", 576).cost(num_layers=30)
    assert c["native_elems"] == 224 and c["written_elems"] == 576 and c["padding_elems"] == 352
    assert c["written_bytes_per_token"] == 576 * 2 * 30 and c["native_decode_flops"] == 2 * (32 + 32 + 64)
    assert c["written_decode_flops"] == 2 * (576 + 512)
    assert mla_layout(gta3, "transformers").rope_dim == 32  # no widening unless the target needs it
    assert mla_layout(gla3, "vllm").spec.row_dim == 320


def test_convert_and_plan_report_the_serving_cost(tmp_path, capsys, monkeypatch):
    import kvslim.convert.pipeline as pipeline
    from kvslim.cli import main

    src = _source()
    src.float().save_pretrained(tmp_path / "src")
    calib = torch.randint(0, VOCAB, (4, 16))
    res = convert_checkpoint(model_dir=tmp_path / "src", out=tmp_path / "gta", to="gta", target="vllm",
                             calib_tokens=calib, progress=False)
    assert res.export["cost"]["head_size"] == 320 and res.export["fp16_ok"]
    cfg = json.loads((tmp_path / "gta" / "config.json").read_text())
    assert cfg["kv_lora_rank"] == 256 and cfg["kvslim_export"]["source_kind"] == "gta"
    with pytest.raises(ValueError, match="320, 512, 576"):
        convert_checkpoint(model_dir=tmp_path / "src", out=tmp_path / "x", to="gla", latent_heads=2, kv_lora_rank=8,
                           rope_dim=8, head_size=100, target="vllm", calib_tokens=calib, progress=False)
    with pytest.raises(ValueError, match="format 'deepseek' only"):
        convert_checkpoint(model_dir=tmp_path / "src", out=tmp_path / "x", to="gla", latent_heads=2, kv_lora_rank=8,
                           rope_dim=8, fmt="kvslim", target="vllm", calib_tokens=calib, progress=False)
    assert not (tmp_path / "x").exists()
    monkeypatch.setattr(pipeline, "calibration_tokens", lambda *a, **k: calib)  # (no tokenizer in the tiny source)
    monkeypatch.setattr(pipeline, "selection_tokens", lambda *a, **k: calib)  # --freqfold auto's windows, likewise
    assert main(["convert", "--model", str(tmp_path / "src"), "--to", "gla", "--latent-heads", "2", "--kv-lora-rank",
                 "8", "--rope-dim", "8", "--target", "vllm", "--mla-head-size", "576", "--out", str(tmp_path / "g")]) == 0
    text = capsys.readouterr().out
    assert "kv_lora_rank 512 (16 used) + qk_rope_head_dim 64 = 576" in text and "rms_norm_eps 1e-06" in text
    assert "representable in fp16" in text
    assert main(["convert", "--model", str(tmp_path / "src"), "--to", "gqa", "--kv-heads", "1", "--target", "vllm",
                 "--out", str(tmp_path / "q")]) == 2
    assert "--to gqa needs" in capsys.readouterr().err
    assert main(["plan", "--hf-config", str(tmp_path / "gta"), "--context", "1024"]) == 0
    assert "320 elements" in capsys.readouterr().out
    assert main(["plan", "--compare", "gta-4,gla-2", "--heads", "8", "--head-dim", "64", "--serve-as", "vllm"]) == 0
    text = capsys.readouterr().out
    assert "gta-4@vllm" in text and "kv_lora_rank 256 (256 used) + qk_rope_head_dim 64 = 320" in text
