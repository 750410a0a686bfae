"""Converters: RoRoPE invariance, exact full-rank conversions, DeepSeek export == kvslim in
transformers, MHA->GQA, bad inputs; slow: the real SmolLM2-135M to MLA."""

import json
import os

import pytest
import torch

from kvslim.convert import (
    attention_input_moments,
    convert_checkpoint,
    gqa_to_gta,
    gqa_to_latent,
    gqa_to_mla,
    max_latent_dim,
    mha_to_gqa,
    rorope_rotation,
    save_deepseek,
    save_kvslim,
)
from kvslim.convert.rorope import rope_pairs_apply
from kvslim.model import Transformer
from kvslim.rope import apply_rope, inv_frequencies
from kvslim.spec import AttentionSpec
from kvslim.testing import assert_close, tiny_model

VOCAB = 97


def _spec(h_kv=2, rope_dim=None, bias=False, h_q=4, d=16):
    return AttentionSpec(kind="gqa" if 1 < h_kv < h_q else ("mqa" if h_kv == 1 else "mha"), hidden_size=64,
                         num_heads=h_q, head_dim=d, num_kv_heads=h_kv, rope_dim=rope_dim, rope_theta=1e4,
                         qkv_bias=bias)


def _model(spec, tie=False, seed=0):
    m = tiny_model(spec, vocab=VOCAB, tie=tie, seed=seed).double()
    if spec.qkv_bias:
        with torch.no_grad():
            for n, p in m.named_parameters():
                if n.endswith("bias"):
                    p.normal_(0, 0.3)
    return m


def _moments(m, n=8, t=24, seed=1):
    g = torch.Generator().manual_seed(seed)
    return attention_input_moments(m, torch.randint(0, VOCAB, (n, t), generator=g), progress=False)


def _tokens(b=2, t=12, seed=2):
    return torch.randint(0, VOCAB, (b, t), generator=torch.Generator().manual_seed(seed))


def _rank1_keys(m, rope_only=False):
    """Make every KV head's rotary key a multiple of head 0's: RoPE then loses nothing."""
    s = m.spec
    d, r = s.head_dim, s.rope_dim
    with torch.no_grad():
        for layer in m.model.layers:
            w = layer.self_attn.k_proj.weight
            b = layer.self_attn.k_proj.bias
            for j in range(1, s.num_kv_heads):
                rows = slice(j * d, j * d + (r if rope_only else d))
                w[rows] = (0.5 + j) * w[0 : (r if rope_only else d)]
                if b is not None:
                    b[rows] = (0.5 + j) * b[0 : (r if rope_only else d)]
    return m


@pytest.mark.parametrize("h_kv,rope_dim", [(2, None), (3, None), (2, 8)])
def test_rorope_rotation_leaves_scores_unchanged(h_kv, rope_dim):
    torch.manual_seed(0)
    h_q, d = 2 * h_kv, 16
    r = rope_dim or d
    n = h_kv * d
    keys = torch.randn(500, n, dtype=torch.float64) @ torch.randn(n, n, dtype=torch.float64)
    rot = rorope_rotation(keys.T @ keys / 500, num_kv_heads=h_kv, head_dim=d, rope_dim=r, target_rope_dim=r)
    R = rot.R
    assert_close(R @ R.T, torch.eye(n, dtype=torch.float64), atol=1e-12)
    inv = inv_frequencies(r, 1e4).double()
    q, k = torch.randn(h_q, d, dtype=torch.float64), torch.randn(h_kv, d, dtype=torch.float64)
    for t, s in [(7, 3), (100, 0), (5, 5)]:
        cos_t = torch.cat([t * inv, t * inv]).cos()[None, None]
        sin_t = torch.cat([t * inv, t * inv]).sin()[None, None]
        cos_s = torch.cat([s * inv, s * inv]).cos()[None, None]
        sin_s = torch.cat([s * inv, s * inv]).sin()[None, None]

        def rope(x, cos, sin):
            return torch.cat([apply_rope(x[..., :r][None, None], cos, sin)[0, 0], x[..., r:]], -1)

        ref = torch.stack([rope(q[h], cos_t, sin_t) @ rope(k[h // (h_q // h_kv)], cos_s, sin_s) for h in range(h_q)])
        k_rot = rope_pairs_apply(R @ k.reshape(-1), rot, inv, torch.tensor(float(s)))
        got = []
        for h in range(h_q):
            j = h // (h_q // h_kv)
            q_pad = torch.zeros(n, dtype=torch.float64)
            q_pad[j * d : (j + 1) * d] = q[h]
            got.append(rope_pairs_apply(R @ q_pad, rot, inv, torch.tensor(float(t))) @ k_rot)
        assert_close(torch.stack(got), ref, atol=1e-10)


@pytest.mark.parametrize("rope,target,fold", [(16, 16, 1), (16, 16, 4), (16, 8, 2), (16, 8, 8), (8, 8, 2)])
def test_rorope_layout_and_energy(rope, target, fold):
    torch.manual_seed(0)
    n = 3 * 16
    X = torch.randn(300, n, dtype=torch.float64)
    rot = rorope_rotation(X.T @ X, num_kv_heads=3, head_dim=16, rope_dim=rope, target_rope_dim=target, freqfold=fold)
    assert rot.R.shape == (n, n) and rot.rope_dim == target
    assert_close(rot.R @ rot.R.T, torch.eye(n, dtype=torch.float64), atol=1e-12)
    assert 0 < rot.kept_energy <= 1
    with pytest.raises(ValueError, match="freqfold"):
        rorope_rotation(X.T @ X, num_kv_heads=3, head_dim=16, rope_dim=rope, target_rope_dim=target, freqfold=3)
    with pytest.raises(ValueError, match="must divide"):
        rorope_rotation(X.T @ X, num_kv_heads=3, head_dim=16, rope_dim=rope, target_rope_dim=6)


def test_rorope_keeps_more_energy_than_any_single_head():
    torch.manual_seed(0)
    n = 3 * 16
    X = torch.randn(400, n, dtype=torch.float64) @ torch.randn(n, n, dtype=torch.float64)
    rot = rorope_rotation(X.T @ X, num_kv_heads=3, head_dim=16, rope_dim=16, target_rope_dim=16)
    S = X.T @ X
    per_head = [float(S.diagonal()[j * 16 : (j + 1) * 16].sum() / S.diagonal().sum()) for j in range(3)]
    assert rot.kept_energy >= max(per_head) - 1e-12


@pytest.mark.parametrize("case,method", [("mqa", "transmla"), ("rank1-gqa", "transmla"),
                                         ("rank1-gqa-bias", "transmla"), ("partial-rope-mqa", "transmla"),
                                         ("mqa", "mha2mla"), ("partial-rope-mqa", "mha2mla")])
def test_mla_full_rank_reproduces_logits(case, method):
    if case == "mqa":
        m = _model(_spec(h_kv=1))
    elif case == "partial-rope-mqa":
        m = _model(_spec(h_kv=1, rope_dim=8))
    else:
        m = _rank1_keys(_model(_spec(h_kv=2, bias=case.endswith("bias"))))
    s = m.spec
    d_r = s.rope_dim
    full = max_latent_dim(s, 1, d_r)
    out = gqa_to_mla(m, _moments(m), kv_lora_rank=full, rope_dim=d_r, method=method, progress=False)
    assert out.spec.kind == "mla" and not out.spec.latent_norm and out.spec.latent_dim == full
    tok = _tokens()
    with torch.no_grad():
        ref = m(tok)
        assert_close(out(tok), ref, atol=1e-8)
    assert_close(_cached(out, tok, 5), ref, atol=1e-4)  # absorbed decode over the latent cache


def _cached(model, tok, prefill):
    """Logits from a prefill of ``prefill`` tokens then one-token decode steps (fp32, torch kernels)."""
    model = model.float()
    model.set_attention_options(impl="torch")
    cache = model.new_cache(tok.shape[0], tok.shape[1], page_size=4)
    with torch.no_grad():
        return torch.cat([model(tok[:, :prefill], cache)]
                         + [model(tok[:, t : t + 1], cache) for t in range(prefill, tok.shape[1])], 1)


def test_norm_selection_is_not_exact_where_rorope_is():
    """Rank-1 keys across heads: RoRoPE moves all RoPE energy into the shared key, picking one head cannot."""
    m = _rank1_keys(_model(_spec(h_kv=2)))
    mom, tok = _moments(m), _tokens()
    with torch.no_grad():
        ref = m(tok)
        errs = {meth: float((gqa_to_mla(m, mom, kv_lora_rank=48, rope_dim=16, method=meth, progress=False)(tok)
                             - ref).abs().max()) for meth in ("transmla", "mha2mla")}
    assert errs["transmla"] < 1e-7 < 1e-4 < errs["mha2mla"], errs


def test_mla_error_shrinks_with_rank_and_gqa_is_approximate():
    m = _model(_spec(h_kv=2))
    mom, tok = _moments(m, n=16), _tokens()
    with torch.no_grad():
        ref = m(tok)
        errs = [float((gqa_to_mla(m, mom, kv_lora_rank=r, rope_dim=16, progress=False)(tok) - ref).pow(2).mean())
                for r in (8, 24, 40, 48)]
    assert errs == sorted(errs, reverse=True), errs
    assert errs[-1] > 0  # RoPE dropped from the non-principal components: not exact for real GQA


def test_gla_full_rank_exact_per_latent_head():
    m = _rank1_keys(_model(_spec(h_kv=2)))
    cap = max_latent_dim(m.spec, 2, 16)
    assert cap == 32  # per latent head: its group's 16 key dims (rank <= n_K) + 16 value dims
    out = gqa_to_latent(m, _moments(m), latent_heads=2, latent_dim=cap, rope_dim=16, progress=False)
    assert out.spec.kind == "gla" and out.spec.num_latent_heads == 2
    tok = _tokens()
    with torch.no_grad():
        assert_close(out(tok), m(tok), atol=1e-8)


def test_latent_rank_larger_than_possible_raises():
    m = _model(_spec(h_kv=2))
    with pytest.raises(ValueError, match="larger than possible"):
        gqa_to_mla(m, _moments(m), kv_lora_rank=49, rope_dim=16, progress=False)
    with pytest.raises(ValueError, match="must divide"):
        gqa_to_latent(m, _moments(m), latent_heads=3, latent_dim=8, rope_dim=16, progress=False)


def test_gta_exact_where_the_math_says():
    """Rank-1 rotary keys (d_R = d_h/2 source RoPE) and NoPE keys in the span of V: exact."""
    m = _rank1_keys(_model(_spec(h_kv=2, rope_dim=8)), rope_only=True)
    d = 16
    with torch.no_grad():
        for layer in m.model.layers:
            a = layer.self_attn
            for j in range(2):
                B = torch.randn(8, d, dtype=torch.float64)
                a.k_proj.weight[j * d + 8 : (j + 1) * d] = B @ a.v_proj.weight[j * d : (j + 1) * d]
    out = gqa_to_gta(m, _moments(m, n=16), state="key", progress=False)
    assert out.spec.kind == "gta" and out.spec.num_kv_heads == 2
    tok = _tokens()
    with torch.no_grad():
        ref = m(tok)
        assert_close(out(tok), ref, atol=1e-7)
    assert_close(_cached(out, tok, 6), ref, atol=1e-4)


def test_gta_approximate_on_a_real_gqa_shape():
    m = _model(_spec(h_kv=2))
    tok = _tokens()
    with torch.no_grad():
        ref = m(tok)
        for state in ("key", "joint"):
            out = gqa_to_gta(m, _moments(m, n=16), state=state, progress=False)
            assert out.spec.row_dim == 2 * 16 + 8
            assert torch.isfinite(out(tok)).all()
            assert (out(tok) - ref).abs().max() > 1e-6


def test_mha_to_gqa_identity_and_pooling():
    m = _model(_spec(h_kv=4, bias=True))
    tok = _tokens()
    same = mha_to_gqa(m, num_kv_heads=4)
    with torch.no_grad():
        assert torch.equal(same(tok), m(tok))
    g2 = mha_to_gqa(m, num_kv_heads=2)
    assert g2.spec.kind == "gqa" and g2.spec.num_kv_heads == 2
    w = m.model.layers[0].self_attn.k_proj
    assert_close(g2.model.layers[0].self_attn.k_proj.weight[:16], (w.weight[:16] + w.weight[16:32]) / 2)
    assert_close(g2.model.layers[0].self_attn.v_proj.bias[16:], (m.model.layers[0].self_attn.v_proj.bias[32:48]
                                                                  + m.model.layers[0].self_attn.v_proj.bias[48:]) / 2)
    mqa = mha_to_gqa(g2, num_kv_heads=1)
    assert mqa.spec.kind == "mqa"
    with pytest.raises(ValueError, match="must divide"):
        mha_to_gqa(m, num_kv_heads=3)


def test_mha_to_gqa_of_identical_heads_is_exact():
    m = _model(_spec(h_kv=4))
    with torch.no_grad():
        for layer in m.model.layers:
            for name in ("k_proj", "v_proj"):
                w = getattr(layer.self_attn, name).weight
                w[16:32], w[48:64] = w[:16], w[32:48]
    tok = _tokens()
    with torch.no_grad():
        assert_close(mha_to_gqa(m, num_kv_heads=2)(tok), m(tok), atol=1e-10)


def test_exported_deepseek_matches_kvslim_in_transformers(tmp_path):
    transformers = pytest.importorskip("transformers")
    m = _model(_spec(h_kv=2), tie=True).float()
    mla = gqa_to_mla(m, _moments(m), kv_lora_rank=20, rope_dim=8, freqfold=2, progress=False)
    save_deepseek(mla, tmp_path / "ds")
    cfg = json.loads((tmp_path / "ds" / "config.json").read_text())
    assert cfg["model_type"] == "deepseek_v3" and cfg["kv_lora_rank"] == 20 and cfg["qk_rope_head_dim"] == 8
    assert cfg["qk_nope_head_dim"] == 16 and cfg["v_head_dim"] == 16 and cfg["first_k_dense_replace"] == 2
    assert cfg["rope_interleave"] is True and cfg["tie_word_embeddings"] is False  # serving-safe (vLLM)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ds", dtype=torch.float32).eval()
    assert type(hf).__name__ == "DeepseekV3ForCausalLM"
    tok = _tokens(t=16)
    with torch.no_grad():
        ref = mla(tok)
        assert_close(hf(tok).logits, ref, atol=1e-4)
        back = Transformer.from_pretrained(tmp_path / "ds")
        assert back.spec.latent_norm
        assert_close(back(tok), ref, atol=1e-4)


def test_deepseek_export_refuses_what_it_cannot_hold(tmp_path):
    m = _model(_spec(h_kv=2, bias=True)).float()
    mla = gqa_to_mla(m, _moments(m), kv_lora_rank=16, rope_dim=16, progress=False)
    with pytest.raises(ValueError, match="bias"):
        save_deepseek(mla, tmp_path / "ds")
    with pytest.raises(ValueError, match="holds MLA, GLA or GTA"):
        save_deepseek(m, tmp_path / "ds")
    assert os.listdir(tmp_path) == []
    save_kvslim(mla, tmp_path / "k")  # biases: kvslim format
    tok = _tokens()
    with torch.no_grad():
        assert_close(Transformer.from_pretrained(tmp_path / "k")(tok), mla(tok), atol=1e-5)


@pytest.fixture
def src_dir(tmp_path):
    m = _model(_spec(h_kv=2)).float()
    m.save_pretrained(tmp_path / "src")
    return tmp_path / "src"


def test_convert_checkpoint_writes_loadable_outputs(src_dir, tmp_path):
    calib = torch.randint(0, VOCAB, (4, 16))
    for to, kw in [("gla", dict(latent_heads=2, kv_lora_rank=16)), ("gta", {}), ("mla", dict(kv_lora_rank=24)),
                   ("gqa", dict(kv_heads=1))]:
        res = convert_checkpoint(model_dir=src_dir, out=tmp_path / to, to=to, rope_dim=16, calib_tokens=calib,
                                 progress=False, **kw)
        loaded = Transformer.from_pretrained(res.out)
        assert loaded.spec.kind == {"gqa": "mqa"}.get(to, to)
        assert res.target.row_dim < res.source.row_dim
    assert sorted(os.listdir(tmp_path)) == ["gla", "gqa", "gta", "mla", "src"]


def test_convert_bad_inputs_raise_and_write_nothing(src_dir, tmp_path, monkeypatch):
    calib = torch.randint(0, VOCAB, (4, 16))
    base = dict(model_dir=src_dir, rope_dim=16, calib_tokens=calib, progress=False)
    cases = [
        (dict(to="mla", kv_lora_rank=49), "larger than possible"),
        (dict(to="mla", kv_lora_rank=8, rope_dim=6), "must divide"),
        (dict(to="mla", kv_lora_rank=8, freqfold=3), "freqfold"),
        (dict(to="gla", kv_lora_rank=8, latent_heads=3), "must divide"),
        (dict(to="gqa", kv_heads=1, fmt="deepseek"), "holds MLA, GLA or GTA"),
        (dict(to="gqa", kv_heads=3), "must divide"),
        (dict(to="gta", freqfold=3), "freqfold"),
        (dict(to="mla", kv_lora_rank=8, dtype="float16"), "float16"),
        (dict(to="xyz"), "target"),
        (dict(to="mla", kv_lora_rank=8, model_dir=tmp_path / "nowhere"), "nowhere.* does not exist"),
    ]
    for kw, match in cases:
        with pytest.raises(ValueError, match=match):
            convert_checkpoint(**{**base, **kw, "out": tmp_path / "out"})
        assert not (tmp_path / "out").exists()
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "config.json").write_text((src_dir / "config.json").read_text())
    with pytest.raises(ValueError, match="safetensors"):
        convert_checkpoint(**{**base, "model_dir": tmp_path / "empty", "to": "gqa", "kv_heads": 1,
                              "out": tmp_path / "out"})
    # an unsupported source architecture: a GTA checkpoint
    gta = tiny_model(AttentionSpec.preset("gta-2", num_heads=4, head_dim=16, hidden_size=64), vocab=VOCAB)
    gta.save_pretrained(tmp_path / "gta_src")
    with pytest.raises(ValueError, match="unsupported source"):
        convert_checkpoint(**{**base, "model_dir": tmp_path / "gta_src", "to": "mla", "kv_lora_rank": 8,
                              "out": tmp_path / "out"})
    # output exists without force: untouched
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "keep.txt").write_text("x")
    with pytest.raises(ValueError, match="--force"):
        convert_checkpoint(**{**base, "to": "gqa", "kv_heads": 1, "out": tmp_path / "taken"})
    assert os.listdir(tmp_path / "taken") == ["keep.txt"]
    # a failure while writing leaves no partial directory
    import kvslim.checkpoint as checkpoint

    def boom(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(checkpoint, "_apply_umask", boom)  # fails after every file is written
    with pytest.raises(RuntimeError, match="disk full"):
        convert_checkpoint(**{**base, "to": "mla", "kv_lora_rank": 8, "out": tmp_path / "out"})
    assert not (tmp_path / "out").exists()
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".out")]


def test_cli_convert(src_dir, tmp_path, capsys):
    from kvslim.cli import main

    assert main(["convert", "--model", str(src_dir), "--to", "gqa", "--kv-heads", "1", "--out",
                 str(tmp_path / "o")]) == 0
    text = capsys.readouterr().out
    assert "before" in text and "after" in text and "mqa" in text
    assert Transformer.from_pretrained(tmp_path / "o").spec.kind == "mqa"
    assert main(["convert", "--model", str(src_dir), "--to", "gqa", "--kv-heads", "1", "--out",
                 str(tmp_path / "o")]) == 2
    assert "--force" in capsys.readouterr().err
    assert main(["convert", "--model", str(src_dir), "--to", "gqa", "--kv-heads", "1", "--out",
                 str(tmp_path / "o"), "--force", "--format", "kvslim"]) == 0


@pytest.mark.slow
def test_smollm2_to_mla_ppl_and_deepseek_export(tmp_path):
    transformers = pytest.importorskip("transformers")
    from kvslim.eval import perplexity, smollm2_dir, split_text, tokenize

    src = smollm2_dir()
    res = convert_checkpoint(model_dir=src, out=tmp_path / "mla", to="mla", kv_lora_rank=128, rope_dim=64,
                             freqfold=1, calib_samples=8, calib_seq_len=128, progress=False)
    assert res.target.row_dim == 192 and res.source.row_dim == 384
    ids = tokenize(split_text("sotu")["eval"], src)[:512]
    orig = Transformer.from_pretrained(src)
    conv = Transformer.from_pretrained(tmp_path / "mla")
    with torch.no_grad():
        p0 = perplexity(orig, ids, seq_len=256, batch_size=4, progress=False)["ppl"]
        p1 = perplexity(conv, ids, seq_len=256, batch_size=4, progress=False)["ppl"]
    assert torch.isfinite(torch.tensor(p1)) and p0 < p1 < 5 * p0, (p0, p1)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "mla", dtype=torch.float32).eval()
    tok = ids[:64][None]
    with torch.no_grad():
        assert_close(hf(tok).logits, conv(tok), atol=2e-3, rtol=1e-3)
