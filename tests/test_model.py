"""The LM: Hugging Face equivalence (Llama, Qwen2, Mistral, DeepSeek-V3 dense), checkpoints, generate."""

import json
import os

import pytest
import torch

from kvslim.model import Transformer
from kvslim.spec import AttentionSpec
from kvslim.testing import TINY_PRESETS, assert_close, tiny_model, tiny_spec

transformers = pytest.importorskip("transformers")

TINY = dict(vocab_size=101, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
            num_attention_heads=4, max_position_embeddings=128, rms_norm_eps=1e-6)


def _hf_roundtrip(hf_model, tmp_path, tokens):
    hf_model.eval()
    hf_model.save_pretrained(tmp_path)
    ours = Transformer.from_pretrained(tmp_path)
    with torch.no_grad():
        ref = hf_model(tokens).logits
        got = ours(tokens)
        cache = ours.new_cache(tokens.shape[0], tokens.shape[1], page_size=4)
        step = torch.cat([ours(tokens[:, :3], cache)] + [ours(tokens[:, t : t + 1], cache)
                                                         for t in range(3, tokens.shape[1])], 1)
    return ours, ref, got, step


@pytest.mark.parametrize("kv_heads,tie,rope", [(2, False, None), (4, True, None), (1, False, None),
                                               (2, False, {"rope_type": "llama3", "factor": 8.0,
                                                           "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                                           "original_max_position_embeddings": 32})])
def test_llama_logits_match_transformers(tmp_path, kv_heads, tie, rope):
    kw = dict(TINY, num_key_value_heads=kv_heads, tie_word_embeddings=tie, rope_theta=1e5)
    if rope:
        kw["rope_scaling"] = dict(rope, rope_theta=1e5)
    cfg = transformers.LlamaConfig(**kw)
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(cfg)
    tokens = torch.randint(0, 101, (2, 11))
    ours, ref, got, step = _hf_roundtrip(hf, tmp_path, tokens)
    assert ours.spec.kind == {4: "mha", 1: "mqa", 2: "gqa"}[kv_heads]
    assert ours.config.tie_word_embeddings == tie
    assert_close(got, ref, atol=1e-4)
    assert_close(step, ref, atol=1e-4)


def test_qwen2_with_qkv_bias_matches_transformers(tmp_path):
    cfg = transformers.Qwen2Config(**TINY, num_key_value_heads=2, tie_word_embeddings=True)
    torch.manual_seed(0)
    hf = transformers.Qwen2ForCausalLM(cfg)
    with torch.no_grad():  # biases start at zero: make them matter
        for n, p in hf.named_parameters():
            if n.endswith("bias"):
                p.normal_(0, 0.5)
    tokens = torch.randint(0, 101, (2, 9))
    ours, ref, got, step = _hf_roundtrip(hf, tmp_path, tokens)
    assert ours.spec.qkv_bias
    assert_close(got, ref, atol=1e-4)
    assert_close(step, ref, atol=1e-4)


def test_qwen2_yarn_matches_transformers(tmp_path):
    """Qwen2.5 long-context configs use YaRN (attention factor on cos/sin, no softmax mscale)."""
    rs = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32}
    cfg = transformers.Qwen2Config(**TINY, num_key_value_heads=2, rope_scaling=dict(rs, rope_theta=1e4))
    torch.manual_seed(0)
    hf = transformers.Qwen2ForCausalLM(cfg)
    tokens = torch.randint(0, 101, (2, 50))
    ours, ref, got, step = _hf_roundtrip(hf, tmp_path, tokens)
    assert ours.spec.rope_scaling["rope_type"] == "yarn"
    assert ours.spec.softmax_scale == pytest.approx(ours.spec.head_dim**-0.5)
    assert_close(got, ref, atol=1e-4)
    assert_close(step, ref, atol=1e-4)


def test_yarn_frequencies_match_transformers():
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from kvslim.rope import rope_parameters

    for rs in (YARN_DS, {"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 4096,
                         "beta_fast": 16, "truncate": False}):
        cfg = transformers.LlamaConfig(hidden_size=512, num_attention_heads=8, max_position_embeddings=32768,
                                       rope_scaling=dict(rs, rope_theta=5e4))
        ref, ref_attn = ROPE_INIT_FUNCTIONS["yarn"](cfg, "cpu")
        inv, attn = rope_parameters(64, 5e4, rs)
        assert_close(inv, ref, atol=0, rtol=1e-6)
        assert attn == pytest.approx(ref_attn, rel=1e-12)


def test_mistral_matches_transformers(tmp_path):
    cfg = transformers.MistralConfig(**TINY, num_key_value_heads=2, sliding_window=None)
    torch.manual_seed(0)
    hf = transformers.MistralForCausalLM(cfg)
    tokens = torch.randint(0, 101, (1, 8))
    _, ref, got, step = _hf_roundtrip(hf, tmp_path, tokens)
    assert_close(got, ref, atol=1e-4)
    assert_close(step, ref, atol=1e-4)


YARN_DS = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32, "beta_fast": 32,
           "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0}


@pytest.mark.parametrize("q_lora,interleave,yarn", [(None, False, False), (32, False, False), (None, True, False),
                                                    (32, True, True)])
def test_deepseek_v3_dense_matches_transformers(tmp_path, q_lora, interleave, yarn):
    """DeepSeek-V3 dense: rotate_half or interleaved RoPE (DeepSeek's default), with YaRN (mscale_all_dim)."""
    extra = {"rope_scaling": dict(YARN_DS, rope_theta=1e4)} if yarn else {}
    cfg = transformers.DeepseekV3Config(
        **TINY, num_key_value_heads=4, kv_lora_rank=24, q_lora_rank=q_lora, qk_rope_head_dim=8,
        qk_nope_head_dim=16, v_head_dim=12, first_k_dense_replace=2, n_routed_experts=4,
        num_experts_per_tok=2, moe_intermediate_size=32, rope_interleave=interleave, rope_theta=1e4, **extra,
    )
    torch.manual_seed(0)
    hf = transformers.DeepseekV3ForCausalLM(cfg)
    with torch.no_grad():
        for n, p in hf.named_parameters():
            if "layernorm" in n:
                p.normal_(1, 0.1)
    tokens = torch.randint(0, 101, (2, 40 if yarn else 10))  # YaRN: past original_max_position_embeddings
    raw = cfg.to_dict()
    ours, ref, got, step = _hf_roundtrip(hf, tmp_path, tokens)
    assert ours.spec.kind == "mla" and ours.spec.latent_dim == 24 and raw["qk_rope_head_dim"] == 8
    if yarn:
        assert ours.spec.softmax_scale != pytest.approx(ours.spec.qk_head_dim**-0.5)  # mscale_all_dim applied
    assert_close(got, ref, atol=1e-4)
    assert_close(step, ref, atol=1e-4)


@pytest.mark.parametrize("name", TINY_PRESETS)
def test_own_checkpoint_roundtrip(tmp_path, name):
    model = tiny_model(tiny_spec(name), tie=name == "gta-2")
    model.save_pretrained(tmp_path / "ckpt")
    cfg = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    assert cfg["format"] == "kvslim-1" and cfg["attention"]["kind"] == model.spec.kind
    loaded = Transformer.from_pretrained(tmp_path / "ckpt")
    tokens = torch.randint(0, 97, (2, 7))
    with torch.no_grad():
        assert torch.equal(loaded(tokens), model(tokens))


def test_failed_write_leaves_nothing(tmp_path, monkeypatch):
    """An exception while writing (here: in the weights) leaves no output and no hidden directory."""
    import kvslim.checkpoint as ck

    def boom(*a, **k):
        raise RuntimeError("interrupted")

    monkeypatch.setattr("safetensors.torch.save_file", boom)
    with pytest.raises(RuntimeError):
        ck.write_model_dir(tmp_path / "out", tensors={"w": torch.ones(2)}, config={})
    assert os.listdir(tmp_path) == []


def test_from_pretrained_errors(tmp_path):
    with pytest.raises(ValueError, match="config.json"):
        Transformer.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({**TINY, "model_type": "gpt2"}))
    with pytest.raises(ValueError, match="model_type"):
        Transformer.from_pretrained(tmp_path)
    model = tiny_model(tiny_spec("gqa-2"))
    model.save_pretrained(tmp_path / "c")
    cfg = json.loads((tmp_path / "c" / "config.json").read_text())
    cfg["attention"] = AttentionSpec.preset("gta-2", num_heads=4, head_dim=16, hidden_size=64).to_dict()
    (tmp_path / "c" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="does not match"):
        Transformer.from_pretrained(tmp_path / "c")
