"""Reading Hugging Face ``config.json`` files into kvslim's shapes: every field type-checked, so a bad
config names its bad field (``AttentionSpec.from_hf_config``, ``ModelConfig.from_hf_config``)."""

from __future__ import annotations

import math
from typing import Any

__all__ = ["HF_GROUPED_TYPES", "as_dict", "hf_int", "hf_rope_scaling", "hf_spec_kwargs", "hf_theta"]


def hf_spec_kwargs(config: Any) -> dict:
    """``AttentionSpec`` keyword arguments from a Hugging Face config (dict, path or PretrainedConfig).

    Supports Llama / Mistral / Mixtral / Qwen2 / Qwen3 (GQA family) and DeepSeek-V2 / V3
    (MLA). Every field read is type-checked, so a bad config names its bad field.
    """
    cfg = as_dict(config)
    model_type = cfg.get("model_type", "")
    if model_type in ("deepseek_v2", "deepseek_v3") or "kv_lora_rank" in cfg:
        D, h_q = hf_int(cfg, "hidden_size"), hf_int(cfg, "num_attention_heads")
        d_n, d_r = hf_int(cfg, "qk_nope_head_dim"), hf_int(cfg, "qk_rope_head_dim", minimum=0)
        return dict(
            kind="mla",
            hidden_size=D,
            num_heads=h_q,
            head_dim=d_n,
            latent_dim=hf_int(cfg, "kv_lora_rank"),
            rope_dim=d_r,
            v_head_dim=hf_int(cfg, "v_head_dim", default=d_n),
            rope_theta=hf_theta(cfg),
            rope_scaling=hf_rope_scaling(cfg),
            q_lora_rank=hf_int(cfg, "q_lora_rank", default=None),
            latent_norm=True,
            qkv_bias=bool(cfg.get("attention_bias", False)),
        )
    if model_type and model_type not in HF_GROUPED_TYPES:
        raise ValueError(
            f"from_hf_config: unsupported model_type {model_type!r} "
            f"(supported: {', '.join(HF_GROUPED_TYPES + ('deepseek_v2', 'deepseek_v3'))})"
        )
    D, h_q = hf_int(cfg, "hidden_size"), hf_int(cfg, "num_attention_heads")
    h_kv = hf_int(cfg, "num_key_value_heads", default=h_q)
    if D % h_q and cfg.get("head_dim") is None:
        raise ValueError(f"HF config: hidden_size={D} is not divisible by num_attention_heads={h_q} "
                         "and no head_dim is given")
    d_h = hf_int(cfg, "head_dim", default=D // h_q)
    kind = "mha" if h_kv == h_q else ("mqa" if h_kv == 1 else "gqa")
    bias = bool(cfg.get("attention_bias", model_type == "qwen2"))
    partial = cfg.get("partial_rotary_factor", 1.0)
    if isinstance(partial, bool) or not isinstance(partial, (int, float)) or not 0 <= partial <= 1:
        raise ValueError(f"HF config: partial_rotary_factor must be a number in [0, 1], got {partial!r}")
    if model_type in ("qwen2", "qwen3") and cfg.get("use_sliding_window"):
        raise ValueError(f"HF config: {model_type} with use_sliding_window=true is not supported (full attention only)")
    qk_norm = model_type == "qwen3"  # Qwen3: per-head RMSNorm of q and k (eps = rms_norm_eps)
    if qk_norm and bias:
        raise ValueError("HF config: Qwen3 with attention_bias=true (it adds an o_proj bias) is not supported")
    return dict(
        kind=kind,
        hidden_size=D,
        num_heads=h_q,
        head_dim=d_h,
        num_kv_heads=h_kv,
        rope_dim=int(d_h * partial) // 2 * 2,
        rope_theta=hf_theta(cfg),
        rope_scaling=hf_rope_scaling(cfg),
        qkv_bias=bias,
        qk_norm=qk_norm,
        qk_norm_eps=cfg.get("rms_norm_eps", 1e-6) if qk_norm else 1e-6,
    )




HF_GROUPED_TYPES = ("llama", "mistral", "mixtral", "qwen2", "qwen3")


def hf_int(cfg: dict, key: str, *, default: Any = ..., minimum: int = 1):
    """An int field of an HF config; a missing, mistyped or out-of-range value names the key."""
    v = cfg.get(key)
    if v is None:
        if default is ...:
            raise ValueError(f"HF config is missing {key!r}")
        return default
    if isinstance(v, bool) or not isinstance(v, int):
        raise ValueError(f"HF config: {key!r} must be an int, got {v!r} ({type(v).__name__})")
    if v < minimum:
        raise ValueError(f"HF config: {key!r} must be >= {minimum}, got {v}")
    return v


def hf_theta(cfg: dict) -> float:
    v = cfg.get("rope_theta", (cfg.get("rope_parameters") or {}).get("rope_theta", 10000.0))
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
        raise ValueError(f"HF config: 'rope_theta' must be a finite number > 0, got {v!r}")
    return float(v)


def hf_rope_scaling(cfg: dict) -> dict | None:
    rs = cfg.get("rope_scaling")
    if rs is None:
        rp = cfg.get("rope_parameters")
        if isinstance(rp, dict) and rp.get("rope_type", "default") != "default":
            rs = {k: v for k, v in rp.items() if k != "rope_theta"}
    if not rs:
        return None
    rs = dict(rs)
    if "rope_type" not in rs and "type" in rs:
        rs["rope_type"] = rs.pop("type")
    if rs.get("rope_type", "default") == "default":
        return None
    if rs.get("rope_type") == "yarn":  # transformers' defaults for what the config leaves out
        mpe = cfg.get("max_position_embeddings")
        if rs.get("original_max_position_embeddings") is None and isinstance(mpe, int):
            rs["original_max_position_embeddings"] = mpe
        if rs.get("factor") is None and isinstance(mpe, int) and rs.get("original_max_position_embeddings"):
            rs["factor"] = mpe / rs["original_max_position_embeddings"]
    return rs


def as_dict(config: Any) -> dict:
    import os

    if isinstance(config, dict):
        return dict(config)
    if isinstance(config, (str, os.PathLike)):
        path = os.fspath(config)
        if os.path.isdir(path):
            path = os.path.join(path, "config.json")
        if not os.path.isfile(path):
            raise ValueError(f"HF config not found: {path}")
        from kvslim.checkpoint import read_json

        return read_json(path)
    if hasattr(config, "to_dict"):
        return config.to_dict()
    raise ValueError(f"cannot read an HF config from {type(config).__name__}")
