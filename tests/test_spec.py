"""AttentionSpec: presets, validation (errors name the field), HF configs, round trips."""

import json

import pytest

from kvslim.spec import AttentionSpec, preset_names


@pytest.mark.parametrize("name", preset_names())
def test_presets_build_and_round_trip(name):
    s = AttentionSpec.preset(name)
    assert s.name == name
    assert s.num_heads == 16 and s.head_dim == 128 and s.hidden_size == 2048
    assert AttentionSpec.from_dict(s.to_dict()) == s
    assert AttentionSpec.from_dict(json.loads(json.dumps(s.to_dict()))) == s


@pytest.mark.parametrize(
    "name, row_dim, m_kv, g_q",
    [
        ("mha", 2 * 16 * 128, 2, 1),
        ("mqa", 2 * 128, 2, 16),
        ("gqa-4", 2 * 4 * 128, 2, 4),
        ("gta-4", 4 * 128 + 64, 1, 4),
        ("mla", 512 + 64, 1, 16),
        ("gla-2", 2 * 256 + 64, 1, 8),
    ],
)
def test_preset_shapes(name, row_dim, m_kv, g_q):
    s = AttentionSpec.preset(name)
    assert (s.row_dim, s.m_kv, s.group_size) == (row_dim, m_kv, g_q)
    assert s.bytes_per_token(2) == 2 * row_dim


def test_preset_overrides():
    s = AttentionSpec.preset("gqa-8", num_heads=32, head_dim=64)
    assert (s.num_heads, s.head_dim, s.hidden_size, s.num_kv_heads) == (32, 64, 2048, 8)


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (
            {"kind": "gqa", "hidden_size": 2048, "num_heads": 16, "head_dim": 128, "num_kv_heads": 3},
            "num_kv_heads",
        ),
        (
            {"kind": "gta", "hidden_size": 2048, "num_heads": 16, "head_dim": 127, "num_kv_heads": 4},
            "head_dim",
        ),
        (
            {
                "kind": "gla",
                "hidden_size": 2048,
                "num_heads": 16,
                "head_dim": 128,
                "num_latent_heads": 3,
                "latent_dim": 256,
                "rope_dim": 64,
            },
            "num_latent_heads",
        ),
        ({"kind": "foo", "hidden_size": 2048, "num_heads": 16, "head_dim": 128}, "kind"),
        (
            {"kind": "gqa", "hidden_size": 2048, "num_heads": 0, "head_dim": 128, "num_kv_heads": 1},
            "num_heads",
        ),
        ({"kind": "mla", "hidden_size": 2048, "num_heads": 16, "head_dim": 128}, "latent_dim"),
    ],
)
def test_validation_names_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        AttentionSpec(**kwargs)


@pytest.mark.parametrize("bad", ["gqa-0", "gqa", "mla-2", "xyz-4"])
def test_bad_preset(bad):
    with pytest.raises(ValueError, match="preset"):
        AttentionSpec.preset(bad)


def test_from_dict_unknown_field():
    d = AttentionSpec.preset("gqa-4").to_dict() | {"bogus": 1}
    with pytest.raises(ValueError, match="bogus"):
        AttentionSpec.from_dict(d)


@pytest.mark.parametrize(
    "cfg, kind, h_kv, d_h",
    [
        (
            {
                "model_type": "llama",
                "hidden_size": 4096,
                "num_attention_heads": 32,
                "num_key_value_heads": 8,
                "rope_theta": 500000.0,
            },
            "gqa",
            8,
            128,
        ),
        (
            {"model_type": "qwen2", "hidden_size": 896, "num_attention_heads": 14, "num_key_value_heads": 2},
            "gqa",
            2,
            64,
        ),
        (
            {
                "model_type": "mistral",
                "hidden_size": 4096,
                "num_attention_heads": 32,
                "num_key_value_heads": 8,
                "head_dim": 128,
            },
            "gqa",
            8,
            128,
        ),
        ({"model_type": "llama", "hidden_size": 2048, "num_attention_heads": 32}, "mha", 32, 64),
    ],
)
def test_from_hf_config_gqa_family(cfg, kind, h_kv, d_h, tmp_path):
    s = AttentionSpec.from_hf_config(cfg)
    assert (s.kind, s.num_kv_heads, s.head_dim) == (kind, h_kv, d_h)
    assert s.row_dim == 2 * h_kv * d_h
    if cfg["model_type"] == "qwen2":
        assert s.qkv_bias
    path = tmp_path / "config.json"
    path.write_text(json.dumps(cfg))
    assert AttentionSpec.from_hf_config(str(path)) == s
    assert AttentionSpec.from_hf_config(str(tmp_path)) == s


def test_from_hf_config_deepseek():
    cfg = {
        "model_type": "deepseek_v3",
        "hidden_size": 7168,
        "num_attention_heads": 128,
        "kv_lora_rank": 512,
        "qk_rope_head_dim": 64,
        "qk_nope_head_dim": 128,
        "v_head_dim": 128,
        "q_lora_rank": 1536,
        "num_hidden_layers": 61,
    }
    s = AttentionSpec.from_hf_config(cfg)
    assert s.kind == "mla"
    assert (s.latent_dim, s.rope_dim, s.head_dim, s.v_head_dim, s.q_lora_rank) == (512, 64, 128, 128, 1536)
    assert s.row_dim == 576 and s.bytes_per_token(2) == 1152
    assert s.group_size == 128 and s.duplication(8) == 8
    assert AttentionSpec.from_dict(s.to_dict()) == s


def test_from_hf_config_errors(tmp_path):
    with pytest.raises(ValueError, match="kv_lora_rank|qk_rope_head_dim|qk_nope_head_dim"):
        AttentionSpec.from_hf_config(
            {"model_type": "deepseek_v2", "hidden_size": 64, "num_attention_heads": 4}
        )
    with pytest.raises(ValueError, match="model_type"):
        AttentionSpec.from_hf_config({"model_type": "gpt2", "hidden_size": 64, "num_attention_heads": 4})
    with pytest.raises(ValueError, match="not found"):
        AttentionSpec.from_hf_config(str(tmp_path / "missing.json"))


def test_tp_views():
    mla, gla, gta = (AttentionSpec.preset(n) for n in ("mla", "gla-2", "gta-4"))
    assert mla.duplication(2) == 2 and mla.row_dim_per_rank(2) == 576
    assert gla.duplication(2) == 1 and gla.row_dim_per_rank(2) == 320
    assert gta.duplication(2) == 1 and gta.row_dim_per_rank(2) == 320
    with pytest.raises(ValueError, match="tp_size"):
        gta.check_tp(3)
