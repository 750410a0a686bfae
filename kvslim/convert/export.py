"""Writing converted models: DeepSeek-V3 (MLA), Hugging Face Llama (GQA) or kvslim's format.

All writes go through :func:`kvslim.checkpoint.write_model_dir`: weights, config and the
source's tokenizer files land in a hidden directory that replaces the output only when
complete, so a failed or interrupted conversion never leaves a half-written checkpoint.

**The latent norm.** Hugging Face's DeepSeek-V3 always applies ``kv_a_layernorm``
(RMSNorm, ε = 1e-6, statistics in fp32) to the latent; a converted latent is not normalised
(``latent_norm=False``). The export makes that norm *exactly linear*: the latent rows of
``kv_a_proj_with_mqa`` are multiplied by a tiny ``s`` and the norm weight is set to
``sqrt(ε)/s``. ``RMSNorm(s·c) = w·s·c / sqrt(mean((s·c)²) + ε)``; ``s`` is chosen from a
rigorous bound so that ``mean((s·c)²) ≤ ε·2⁻³⁰`` for *every* input: the attention input is
``w_ln ⊙ n`` with ``‖n‖² ≤ D`` (it leaves ``input_layernorm``), so
``‖c‖ ≤ ‖W_c diag(w_ln)‖₂·sqrt(D) + ‖b_c‖``. In fp32 ``ε + mean(·)`` then rounds to ``ε``
and the norm returns exactly ``c``·(1 + O(2⁻²⁴)). Costs: latent values become ~1e-9 (fine in
fp32/bf16, whose exponent range is fp32's; fp16 would underflow, so it is refused), and the
exported checkpoint is for inference: to fine-tune, use the kvslim format, where the latent
has no norm, or re-scale first (an optimiser's steps would swamp the tiny weights).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from kvslim.checkpoint import FORMAT, state_dict_for_save, write_model_dir
from kvslim.runtime import dtype_name

__all__ = ["LATENT_NORM_EPS", "save_deepseek", "save_hf_llama", "save_kvslim", "write_checkpoint"]

#: transformers' DeepseekV3 builds ``kv_a_layernorm`` with its default eps (not rms_norm_eps);
#: kvslim's LatentAttention uses the same default.
LATENT_NORM_EPS = 1e-6
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def save_kvslim(model, path, *, dtype: torch.dtype = torch.float32, **write) -> Path:
    """kvslim's own format (loadable by ``Transformer.from_pretrained``), any attention kind.

    ``write``: ``tokenizer_from``, ``force``, ``sources`` of :func:`kvslim.checkpoint.write_model_dir`.
    """
    return write_model_dir(path, tensors=state_dict_for_save(model, dtype),
                           config={"format": FORMAT, **model.config.to_dict()}, **write)


def _rope_fields(spec) -> dict:
    params = {"rope_type": "default", "rope_theta": float(spec.rope_theta)}
    out = {"rope_theta": float(spec.rope_theta)}
    if spec.rope_scaling:
        params = {**spec.rope_scaling, "rope_theta": float(spec.rope_theta)}
        out["rope_scaling"] = dict(spec.rope_scaling)
    out["rope_parameters"] = params
    return out


def _common_hf(cfg, dtype) -> dict:
    return {
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size, "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_layers, "num_attention_heads": cfg.attention.num_heads,
        "rms_norm_eps": cfg.rms_norm_eps, "tie_word_embeddings": cfg.tie_word_embeddings,
        "max_position_embeddings": cfg.max_position_embeddings, "hidden_act": "silu",
        "torch_dtype": dtype_name(dtype), "initializer_range": 0.02, "attention_dropout": 0.0,
        **_rope_fields(cfg.attention),
    }


def save_hf_llama(model, path, *, dtype: torch.dtype = torch.float32, **write) -> Path:
    """A GQA/MQA/MHA model as a Hugging Face Llama checkpoint (same weight names)."""
    cfg, spec = model.config, model.spec
    if spec.kind not in ("mha", "mqa", "gqa") or spec.rope_dim != spec.head_dim or spec.qkv_bias or cfg.mlp_bias:
        raise ValueError("format 'hf' (Llama) needs a full-RoPE MHA/MQA/GQA model without biases; use format 'kvslim'")
    hf = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", **_common_hf(cfg, dtype),
          "num_key_value_heads": spec.num_kv_heads, "head_dim": spec.head_dim, "attention_bias": False,
          "mlp_bias": False}
    return write_model_dir(path, tensors=state_dict_for_save(model, dtype), config=hf, **write)


def latent_scale(W_lat: torch.Tensor, b_lat: torch.Tensor | None, ln_weight: torch.Tensor, eps: float) -> float:
    """``s`` with ``mean((s·c)²) <= eps·2⁻³⁰`` for every input of the layer (see module docstring)."""
    D, r = W_lat.shape[1], W_lat.shape[0]
    sigma = torch.linalg.matrix_norm(W_lat.double() * ln_weight.double().abs()[None, :], ord=2)
    bound = float(sigma) * math.sqrt(D) + (float(b_lat.double().norm()) if b_lat is not None else 0.0)
    return math.sqrt(eps * 2.0**-30 * r) / max(bound, 1e-30)


def save_deepseek(model, path, *, dtype: torch.dtype = torch.float32, **write) -> Path:
    """An MLA model (``latent_norm=False``, no q-LoRA) as a Hugging Face DeepSeek-V3 dense checkpoint.

    ``first_k_dense_replace = num_layers`` (all MLPs dense), ``rope_interleave = false``
    (rotate_half RoPE, as kvslim), ``kv_a_layernorm`` made exactly linear (module docstring).
    """
    cfg, spec = model.config, model.spec
    if spec.kind != "mla":
        raise ValueError(f"format 'deepseek' holds MLA models only, got kind {spec.kind!r}; use format 'kvslim'")
    if spec.latent_norm or spec.q_lora_rank:
        raise ValueError("format 'deepseek' export expects a converted MLA (latent_norm=False, no q_lora_rank)")
    if spec.qkv_bias or cfg.mlp_bias:
        raise ValueError("transformers' DeepSeek-V3 has no q_proj bias: a model with qkv biases needs format 'kvslim'")
    if dtype == torch.float16:
        raise ValueError("format 'deepseek' with float16 would underflow the scaled latent; use bfloat16 or float32")
    sd = state_dict_for_save(model, torch.float64)
    r = spec.latent_dim
    for i in range(cfg.num_layers):
        pre = f"model.layers.{i}.self_attn."
        W = sd[pre + "kv_a_proj_with_mqa.weight"]
        ln = sd[f"model.layers.{i}.input_layernorm.weight"]
        s = latent_scale(W[:r], None, ln, LATENT_NORM_EPS)
        W[:r] *= s
        sd[pre + "kv_a_layernorm.weight"] = torch.full((r,), math.sqrt(LATENT_NORM_EPS) / s, dtype=torch.float64)
    sd = {k: v.to(dtype) for k, v in sd.items()}
    hf = {
        "architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3", **_common_hf(cfg, dtype),
        "num_key_value_heads": spec.num_heads, "kv_lora_rank": r, "q_lora_rank": None,
        "qk_rope_head_dim": spec.rope_dim, "qk_nope_head_dim": spec.head_dim, "v_head_dim": spec.v_head_dim,
        "head_dim": spec.rope_dim, "first_k_dense_replace": cfg.num_layers, "n_routed_experts": 1,
        "n_shared_experts": 1, "num_experts_per_tok": 1, "n_group": 1, "topk_group": 1,
        "moe_intermediate_size": cfg.intermediate_size, "rope_interleave": False, "attention_bias": False,
        "mlp_bias": False, "kvslim_source": "kvslim convert (TransMLA); kv_a_layernorm is exactly linear",
    }
    return write_model_dir(path, tensors=sd, config=hf, **write)


def write_checkpoint(model, path, *, fmt: str, dtype: torch.dtype = torch.float32, **write) -> Path:
    """Write ``model`` in format ``deepseek``, ``hf`` or ``kvslim`` (``write``: see :func:`save_kvslim`)."""
    writers = {"deepseek": save_deepseek, "hf": save_hf_llama, "kvslim": save_kvslim}
    if fmt not in writers:
        raise ValueError(f"format must be one of {sorted(writers)}, got {fmt!r}")
    return writers[fmt](model, path, dtype=dtype, **write)
