"""QK-norm sources (issue #16, Qwen3): exact loading against transformers, exact full-rank conversion to
MLA / GLA / GTA, reduced-rank decode == prefill, the engine, TP shards, the DeepSeek refusal, and proof
that the tolerances would catch an ignored ``k_norm``."""

import os

import pytest
import torch
from test_convert import VOCAB, _cached, _moments, _tokens
from torch import nn

from kvslim.attention import build_attention
from kvslim.cache import KVCache
from kvslim.convert import (
    convert_checkpoint,
    gqa_to_gta,
    gqa_to_latent,
    gqa_to_mla,
    max_latent_dim,
    mha_to_gqa,
    save_deepseek,
)
from kvslim.model import Transformer
from kvslim.spec import AttentionSpec
from kvslim.testing import assert_close, tiny_model

# The models are float64 but kvslim's RoPE and RMSNorm compute in fp32 (rope.py, layers.py) and the
# converters scale the query before RoPE, so "exact" is fp32 rounding: measured <= 6e-7 on logits up to
# 7.3 (<= 2.2e-6 with fp32 weights, and through the paged-cache decode). An ignored k_norm costs > 0.1.
EXACT, FP32 = 2e-6, 1e-5


def _spec(h_kv=2, rope_dim=None, kind=None, **kw):
    kind = kind or ("mqa" if h_kv == 1 else "gqa")
    return AttentionSpec(kind=kind, hidden_size=64, num_heads=4, head_dim=16, num_kv_heads=h_kv, rope_dim=rope_dim,
                         rope_theta=1e4, qk_norm=True, qk_norm_eps=1e-5, **kw)


def _source(h_kv=2, rope_dim=None, same_keys=False, low_rank_v=False, seed=0):
    """A tiny QK-norm model (float64; tiny_model randomises q_norm/k_norm weights). ``same_keys``: every
    KV head has head 0's key projection, so RoRoPE keeps all RoPE (the exact case); ``low_rank_v``: each
    value head spans d_h/2 dims (GTA's exact case)."""
    m = tiny_model(_spec(h_kv, rope_dim), vocab=VOCAB, seed=seed).double()
    g = torch.Generator().manual_seed(seed + 7)
    with torch.no_grad():
        m.lm_head.weight.mul_(10)  # logits of a few units
        for layer in m.model.layers:
            a = layer.self_attn
            a.k_proj.weight.mul_(5)  # unnormalised keys far from unit RMS: the norm matters
            for j in range(1, h_kv if same_keys else 1):
                a.k_proj.weight[j * 16 : (j + 1) * 16] = a.k_proj.weight[:16]
            for j in range(h_kv if low_rank_v else 0):
                w = a.v_proj.weight[j * 16 : (j + 1) * 16]
                w.copy_(torch.randn(16, 8, generator=g, dtype=torch.float64) @ w[:8] / 3)
    return m


def _hf_qwen3(path, *, layers=2, tie=False):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.Qwen3Config(vocab_size=VOCAB, hidden_size=48, intermediate_size=96, num_hidden_layers=layers,
                                   num_attention_heads=4, num_key_value_heads=2, head_dim=20, rms_norm_eps=1e-5,
                                   rope_theta=1e4, max_position_embeddings=128, tie_word_embeddings=tie)
    torch.manual_seed(0)
    ref = transformers.Qwen3ForCausalLM(cfg).eval()
    with torch.no_grad():
        for n, p in ref.named_parameters():
            if n.endswith("norm.weight"):
                p.copy_(1 + 0.3 * torch.randn_like(p))
            elif p.dim() == 2:
                p.mul_(10)  # logits of O(1): a wrong norm shows
    ref.save_pretrained(path)
    return ref


def test_qwen3_loads_exactly_and_decodes_like_transformers(tmp_path):
    ref = _hf_qwen3(tmp_path / "hf")
    m = Transformer.from_pretrained(tmp_path / "hf").eval()
    s = m.spec
    assert (s.kind, s.num_kv_heads, s.head_dim, s.qk_norm, s.qk_norm_eps, s.qkv_bias) == ("gqa", 2, 20, True, 1e-5,
                                                                                          False)
    assert s.head_dim * s.num_heads != s.hidden_size
    tok = _tokens(t=13)
    with torch.no_grad():
        want = ref(tok).logits
        assert want.abs().max() > 1
        assert_close(m(tok), want, atol=2e-5, rtol=1e-4)
    assert_close(_cached(m, tok, 5), want, atol=2e-5, rtol=1e-4)  # paged cache, torch decode kernel
    hf_greedy = ref.generate(tok[:1], max_new_tokens=6, do_sample=False)[0, tok.shape[1]:].tolist()
    assert m.generate([tok[0].tolist()], max_new_tokens=6) == [hf_greedy]


def test_qwen3_config_fields_and_refusals():
    base = dict(model_type="qwen3", hidden_size=48, num_attention_heads=4, num_key_value_heads=2, head_dim=20,
                rms_norm_eps=1e-5)
    s = AttentionSpec.from_hf_config(base)
    assert s.qk_norm and s.qk_norm_eps == 1e-5 and not s.qkv_bias and s.rope_dim == 20
    assert not AttentionSpec.from_hf_config({**base, "model_type": "qwen2"}).qk_norm
    assert AttentionSpec.from_dict(s.to_dict()) == s
    with pytest.raises(ValueError, match="use_sliding_window"):
        AttentionSpec.from_hf_config({**base, "use_sliding_window": True})
    with pytest.raises(ValueError, match="attention_bias"):
        AttentionSpec.from_hf_config({**base, "attention_bias": True})
    with pytest.raises(ValueError, match="qk_norm_eps"):
        AttentionSpec.from_hf_config({**base, "rms_norm_eps": "tiny"})
    lat = dict(kind="mla", hidden_size=64, num_heads=4, head_dim=16, latent_dim=8, rope_dim=8)
    with pytest.raises(ValueError, match="num_kv_heads .* is required"):
        AttentionSpec(**lat, qk_norm=True)
    with pytest.raises(ValueError, match="without qk_norm"):
        AttentionSpec(**lat, num_kv_heads=2)
    with pytest.raises(ValueError, match="q_lora_rank"):
        AttentionSpec(**lat, num_kv_heads=2, qk_norm=True, q_lora_rank=8)
    with pytest.raises(ValueError, match="qk_norm must be a bool"):
        AttentionSpec(**lat, num_kv_heads=2, qk_norm=1)
    assert AttentionSpec(**lat, num_kv_heads=2, qk_norm=True).row_dim == 8 + 8  # the cache is unchanged


CASES = {  # name: (source kwargs, converter)
    "mla-mqa": (dict(h_kv=1), lambda m, mo, **kw: gqa_to_mla(m, mo, kv_lora_rank=16, rope_dim=16, **kw)),
    "mla-gqa": (dict(same_keys=True), lambda m, mo, **kw: gqa_to_mla(
        m, mo, kv_lora_rank=max_latent_dim(m.spec, 1, 16), rope_dim=16, **kw)),
    "gla-2": (dict(same_keys=True), lambda m, mo, **kw: gqa_to_latent(
        m, mo, latent_heads=2, latent_dim=max_latent_dim(m.spec, 2, 16), rope_dim=16, **kw)),
    "gta-2": (dict(rope_dim=8, same_keys=True, low_rank_v=True), lambda m, mo, fit, **kw: gqa_to_gta(
        m, mo, state="key" if fit == "bkv" else "joint", fit=fit, **kw)),
}


# GTA's exact case needs state='key', which fit='output' does not fit
@pytest.mark.parametrize("case,fit", [(c, f) for c in sorted(CASES) for f in ("bkv", "output")
                                      if (c, f) != ("gta-2", "output")])
def test_full_rank_conversion_reproduces_the_qk_norm_source(case, fit):
    src_kw, convert = CASES[case]
    m = _source(**src_kw)
    out = convert(m, _moments(m), fit=fit, progress=False)
    s = out.spec
    assert s.kind == case.split("-")[0] and s.qk_norm and s.qk_norm_eps == 1e-5
    tok = _tokens()
    with torch.no_grad():
        ref = m(tok)
        assert ref.abs().max() > 5
        assert_close(out(tok), ref, atol=EXACT, rtol=0)
        assert_close(out.float()(tok), ref, atol=FP32, rtol=0)  # the same weights in fp32
    assert_close(_cached(out, tok, 5), ref, atol=FP32, rtol=0)  # absorbed / tied decode over the paged cache


def _drop_k_norm(model):
    for layer in model.model.layers:
        layer.self_attn.k_norm = nn.Identity()
    return model


def test_ignoring_k_norm_is_caught(tmp_path):
    """The tolerances above would catch an implementation that skips k_norm, in loading and in conversion,
    and so does TransMLA's linear recipe (its issue #22): converting the same weights as a plain GQA model."""
    m = _source(same_keys=True)
    full = max_latent_dim(m.spec, 1, 16)
    out = gqa_to_mla(m, _moments(m), kv_lora_rank=full, rope_dim=16, progress=False)
    tok = _tokens()
    plain = Transformer(m.config.with_attention(m.spec.replace(qk_norm=False))).double()
    plain.load_state_dict({k: v for k, v in m.state_dict().items() if "_norm." not in k})
    linear = gqa_to_mla(plain, _moments(plain), kv_lora_rank=full, rope_dim=16, progress=False)
    with torch.no_grad():
        ref = m(tok)
        assert (linear(tok) - ref).abs().max() > 0.1
        assert (_drop_k_norm(out)(tok) - ref).abs().max() > 0.1
        loaded = _drop_k_norm(Transformer.from_pretrained(_hf_dir(tmp_path)))
        assert (loaded(_tokens(t=13)) - _hf_logits(tmp_path)).abs().max() > 0.1


def _hf_dir(tmp_path):
    if not (tmp_path / "hf").exists():
        _hf_qwen3(tmp_path / "hf")
    return tmp_path / "hf"


def _hf_logits(tmp_path):
    import transformers

    with torch.no_grad():
        return transformers.Qwen3ForCausalLM.from_pretrained(_hf_dir(tmp_path)).eval()(_tokens(t=13)).logits


@pytest.mark.parametrize("target", ["mla", "gla", "gta"])
def test_reduced_rank_runs_and_decode_equals_prefill(target):
    m = _source(seed=3)
    mom, tok = _moments(m, n=16), _tokens(t=14)
    if target == "gta":
        out = gqa_to_gta(m, mom, fit="output", progress=False)
    else:
        out = gqa_to_latent(m, mom, latent_heads=1 if target == "mla" else 2, latent_dim=6, rope_dim=8,
                            freqfold=2, fit="output", progress=False)
        assert out.spec.row_dim == (6 if target == "mla" else 12) + 8
    out = out.float()
    with torch.no_grad():
        ref = out(tok)
        err = (ref - m.float()(tok)).abs().max()
    assert torch.isfinite(ref).all() and 1e-5 < err < 10
    for impl, page in (("torch", 4), ("triton", 3)):  # the kernels see only q and cache rows
        out.set_attention_options(impl=impl)
        cache = out.new_cache(tok.shape[0], tok.shape[1], page_size=page)
        with torch.no_grad():
            got = torch.cat([out(tok[:, :5], cache)] + [out(tok[:, t : t + 1], cache) for t in range(5, 14)], 1)
        assert_close(got, ref, atol=1e-4, msg=f"{target} {impl}")


@pytest.mark.parametrize("target", ["mla", "gta"])
def test_engine_generates_on_a_converted_qk_norm_model(target):
    from kvslim.engine.config import EngineConfig
    from kvslim.engine.engine import LLMEngine
    from kvslim.engine.scheduler import SamplingParams

    m = _source(seed=4)
    mom = _moments(m)
    out = (gqa_to_mla(m, mom, kv_lora_rank=12, rope_dim=16, progress=False) if target == "mla"
           else gqa_to_gta(m, mom, progress=False)).float()
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(0, VOCAB, (n,), generator=g).tolist() for n in (3, 11, 7)]
    ref = out.generate(prompts, max_new_tokens=6)
    eng = LLMEngine(out, EngineConfig(num_pages=32, page_size=4, max_batch=4, max_num_batched_tokens=8))
    assert eng.generate(prompts, SamplingParams(max_tokens=6), arrival_steps=[0, 0, 2]) == ref
    out.fuse_projections()  # one GEMM for q/k/v of the front: same model
    assert out.generate(prompts, max_new_tokens=6) == ref


@pytest.mark.parametrize("kind,tp", [("gqa", 2), ("gta", 2), ("mla", 2), ("gla", 2)])
def test_tensor_parallel_shards_of_qk_norm_modules(kind, tp):
    extra = {"gqa": {}, "gta": {}, "mla": dict(latent_dim=8), "gla": dict(latent_dim=8, num_latent_heads=2)}[kind]
    spec = _spec(kind=kind, rope_dim=8 if extra else None, **extra)
    torch.manual_seed(1)
    full = build_attention(spec)
    with torch.no_grad():
        for p in full.parameters():
            p.normal_(0, 0.3)
    x, pos = torch.randn(2, 6, 64), torch.arange(6)[None].expand(2, 6)
    cls = type(full)
    with torch.no_grad():
        ref = full(x, pos)
        parts = []
        for r in range(tp):
            shard = cls(spec, tp_rank=r, tp_size=tp)
            shard.load_state_dict(cls.shard_state_dict(full.state_dict(), spec, r, tp))
            cache = KVCache(spec, 1, batch=2, max_len=8, page_size=2, tp_size=tp)
            o = [shard(x[:, :3], pos[:, :3], cache.layer(0))]
            cache.advance(3)
            for t in range(3, 6):
                o.append(shard(x[:, t : t + 1], pos[:, t : t + 1], cache.layer(0)))
                cache.advance(1)
            parts.append(torch.cat(o, 1))
    assert_close(sum(parts), ref, atol=1e-5)


def test_checkpoint_conversion_of_qwen3_and_deepseek_refusal(tmp_path):
    _hf_qwen3(tmp_path / "hf")
    calib = torch.randint(0, VOCAB, (4, 16), generator=torch.Generator().manual_seed(6))
    base = dict(model_dir=tmp_path / "hf", to="mla", kv_lora_rank=16, rope_dim=20, calib_tokens=calib,
                progress=False)
    for kw in (dict(fmt="deepseek"), {}, dict(target="vllm")):  # mla's default format is deepseek
        with pytest.raises(ValueError, match="QK-norm.*per-head k_norm.*--format kvslim"):
            convert_checkpoint(**base, **kw, out=tmp_path / "out")
        assert not (tmp_path / "out").exists()
    src = Transformer.from_pretrained(tmp_path / "hf")
    res = {stream: convert_checkpoint(**{**base, "kv_lora_rank": 60}, fmt="kvslim", stream=stream,
                                      out=tmp_path / f"mla{stream}") for stream in (True, False)}
    assert res[True].target.qk_norm and res[True].target.num_kv_heads == 2
    assert (tmp_path / "mlaTrue" / "model.safetensors").read_bytes() == \
        (tmp_path / "mlaFalse" / "model.safetensors").read_bytes()  # streaming == in memory
    conv = Transformer.from_pretrained(tmp_path / "mlaTrue")
    with torch.no_grad():
        assert torch.isfinite(conv(_tokens(t=13))).all()
    with pytest.raises(ValueError, match="QK-norm"):
        save_deepseek(conv, tmp_path / "ds")
    assert sorted(os.listdir(tmp_path)) == ["hf", "mlaFalse", "mlaTrue"]
    with pytest.raises(ValueError, match="only method='transmla'"):
        gqa_to_mla(src, None, kv_lora_rank=8, rope_dim=20, method="mha2mla", progress=False)
    with torch.no_grad():  # mean-pooling keeps the norms; pooling to the same heads is the identity
        assert torch.equal(mha_to_gqa(src, num_kv_heads=2)(_tokens()), src(_tokens()))
