"""Serving-safe DeepSeek-V3 export: one checkpoint that transformers, vLLM and SGLang compute alike.

Input: a kvslim MLA, GLA or GTA model (converted: no latent norm, no q-LoRA). It is first
re-expressed exactly as an MLA model of the target's shapes (as_mla.py, kvslim/serving.py),
then written with these rules, each exact (to one rounding of the weights):

1. **One eps for every norm.** transformers builds ``kv_a_layernorm`` with its RMSNorm default
   ε* = 1e-6; vLLM and SGLang build it with ``config.rms_norm_eps``. The export declares
   ``rms_norm_eps = ε*``, so all three use ε*. The model's other RMSNorms were trained with the
   source's ε (SmolLM2: 1e-5); ``RMSNorm_ε(h) = RMSNorm_{λ²ε}(λh)``, so scaling the residual
   stream by ``λ = sqrt(ε*/ε)`` (the embeddings, every ``o_proj`` and ``down_proj``) keeps every
   norm's output unchanged under ε*. ``lm_head`` reads the final norm's output and keeps the
   unscaled embedding, so it is always written untied (vLLM's DeepSeek never ties).
2. **An exactly linear latent norm.** A converted latent ``c`` is not normalised, but DeepSeek
   always applies ``RMSNorm(x) = w·x/sqrt(mean(x²) + ε*)``. With ``x = s·c`` and ``w = sqrt(ε*)/s``
   it returns ``c/sqrt(1 + mean((s·c)²)/ε*)``. ``s`` comes from a rigorous bound: the attention
   input is ``w_ln ⊙ n`` with ``‖n‖² < D`` (it leaves ``input_layernorm``), so
   ``‖c‖ ≤ B = ‖W_c diag(w_ln)‖₂·sqrt(D)``. With ``w = 2^a`` and ``a = ceil(log2(B/sqrt(r')) + 12)``
   (r' the written latent width), ``mean((s·c)²)/ε* ≤ 2⁻²⁴`` for *every* input: the norm is the
   identity to within 2⁻²⁵ relative. Where that needs ``a > 15`` (a weight fp16 cannot hold), ``a`` is
   15 if that still gives 2⁻²² (within 2⁻²³, fp32's epsilon; SmolLM2 MLA r=128 unpadded needs it).
3. **fp16-representable weights.** ``s`` is ~1e-8, so putting all of it on the latent rows
   underflows fp16 (and a weight ``1/s`` overflows it). The norm weight is the power of two
   ``2^a`` (≤ 2¹⁵, exact in every format) and the rest is split: the layer's
   ``input_layernorm`` weight is multiplied by ``2^b`` and ``q_proj`` and the RoPE-key rows by
   ``2^-b`` (powers of two: exact), the latent rows by ``s·2^-b``. ``b`` is chosen to minimise the
   worst relative error of casting those tensors to fp16. The latent *activations* stay ~1e-7,
   so fp16 *compute* cannot run this norm (serve in bf16 or fp32); ``--dtype float16`` is refused.
4. **Interleaved RoPE.** vLLM always rotates interleaved pairs (it ignores ``rope_interleave:
   false``); the RoPE rows are permuted to interleaved order and ``rope_interleave: true`` written.
5. **Biases.** DeepSeek-V3 has none. A latent bias that only keys read adds ``q·b`` to every
   score of a query: a constant that cancels in softmax, so it is dropped. A query bias, a bias
   of the RoPE key (rotated by position) or one that reaches the values (it adds a constant
   ``o_proj(W_UV·b)`` to the output) is not exact without a bias and is refused, saying which.
6. **No QK-norm sources.** A Qwen3-style source normalises every key head on its own (``k_norm``);
   DeepSeek's ``kv_a_proj_with_mqa`` is linear in ``x`` followed by one RMSNorm of the whole latent,
   so it cannot express per-head key norms: :func:`check_deepseek_source` refuses (kvslim's format
   computes the row from the normalised keys, attention/qknorm.py).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from kvslim.checkpoint import state_dict_for_save, write_model_dir
from kvslim.convert.as_mla import as_mla
from kvslim.model import ModelConfig, deinterleave_perm, permute_rope_rows
from kvslim.runtime import dtype_name
from kvslim.serving import mla_layout

__all__ = ["LATENT_NORM_EPS", "check_qk_norm", "deepseek_config", "deepseek_ends", "deepseek_state", "fp16_check", "fp16_error", "hf_common",
           "save_deepseek"]

#: transformers' DeepseekV3 builds ``kv_a_layernorm`` with its RMSNorm default (not rms_norm_eps);
#: the export declares this as ``rms_norm_eps`` so vLLM and SGLang use it too.
LATENT_NORM_EPS = 1e-6
FP16_SAFE = 2.0**15  # largest weight allowed after the split (a bf16 rounding of it stays finite in fp16)
NORM_EXP_MAX = 15  # kv_a_layernorm weight 2^15 = 32768 is finite in fp16; 2^16 is not
BIAS_TOL = 1e-6


def _rope_fields(spec) -> dict:
    params = {"rope_type": "default", "rope_theta": float(spec.rope_theta)}
    out = {"rope_theta": float(spec.rope_theta)}
    if spec.rope_scaling:
        params = {**spec.rope_scaling, "rope_theta": float(spec.rope_theta)}
        out["rope_scaling"] = dict(spec.rope_scaling)
    out["rope_parameters"] = params
    return out


def check_qk_norm(spec) -> None:
    """Refuse a QK-norm model (rule 6): DeepSeek-V3 cannot normalise each key head on its own."""
    if spec.qk_norm:
        raise ValueError(
            "format 'deepseek' cannot hold a QK-norm model (Qwen3's per-head k_norm): DeepSeek-V3 computes the "
            "cache row as kv_a_proj_with_mqa (linear in x) + one RMSNorm of the whole latent, which cannot "
            "normalise each key head on its own, so no DeepSeek checkpoint computes these keys; use --format kvslim "
            "(its row is computed from the normalised keys)")


def hf_common(cfg, dtype: torch.dtype = torch.float32) -> dict:
    """config.json fields every Hugging Face writer of kvslim shares (Llama and DeepSeek)."""
    return {
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size, "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_layers, "num_attention_heads": cfg.attention.num_heads,
        "rms_norm_eps": cfg.rms_norm_eps, "tie_word_embeddings": cfg.tie_word_embeddings,
        "max_position_embeddings": cfg.max_position_embeddings, "hidden_act": "silu",
        "torch_dtype": dtype_name(dtype), "initializer_range": 0.02, "attention_dropout": 0.0,
        **_rope_fields(cfg.attention),
    }


FP16_CHECK_CHUNK = 1 << 24  # elements: fp16_error's working copies stay ~64 MB each, whatever the tensor


def fp16_error(t: torch.Tensor) -> float:
    """Relative Frobenius error of casting ``t`` to fp16 (inf if any value overflows).

    A tensor of more than ``FP16_CHECK_CHUNK`` elements is checked in pieces of that size (the squared
    norms summed in float64), so checking an 8B model's 0.5G-element embedding does not take several
    fp32 copies of it (the in-memory and streaming exports share this function, so they still agree).
    """
    if t.numel() > FP16_CHECK_CHUNK:
        flat, err2, ref2 = t.reshape(-1), 0.0, 0.0
        for s in range(0, flat.numel(), FP16_CHECK_CHUNK):
            x = flat[s : s + FP16_CHECK_CHUNK]
            h = x.half()
            if not bool(h.isfinite().all()):
                return math.inf
            x = x.float()
            err2 += float((h.float() - x).norm()) ** 2
            ref2 += float(x.norm()) ** 2
        return math.sqrt(err2) / math.sqrt(ref2) if ref2 > 0 else 0.0
    h = t.half()
    if not bool(h.isfinite().all()):
        return math.inf
    norm = float(t.float().norm())
    return float((h.float() - t.float()).norm()) / norm if norm > 0 else 0.0


def _negligible(b: torch.Tensor, scale: float) -> bool:
    return float(b.norm()) <= BIAS_TOL * max(scale, 1e-300)


def _check_biases(sd: dict, spec, num_layers: int) -> None:
    """Refuse biases a DeepSeek checkpoint cannot hold exactly; drop (in ``sd``) the ones that cancel."""
    d_n, d_v, r, h_q = spec.head_dim, spec.v_head_dim, spec.latent_dim, spec.num_heads
    for i in range(num_layers):
        pre = f"model.layers.{i}.self_attn."
        bq = sd.pop(pre + "q_proj.bias", None)
        if bq is not None and not _negligible(bq, float(sd[pre + "q_proj.weight"].norm())):
            raise ValueError(f"layer {i}: a query bias is not exact in DeepSeek-V3, which has no q_proj bias "
                             "(it adds b_q·k to the scores, which varies with the key); use format 'kvslim'")
        b = sd.pop(pre + "kv_a_proj_with_mqa.bias", None)
        if b is None:
            continue
        w = sd[pre + "kv_a_proj_with_mqa.weight"]
        if not _negligible(b[r:], float(w[r:].norm())):
            raise ValueError(f"layer {i}: the RoPE key's bias is rotated by position, so it does not cancel in "
                             "softmax, and DeepSeek-V3 has no kv_a_proj_with_mqa bias; use format 'kvslim'")
        w_uv = sd[pre + "kv_b_proj.weight"].view(h_q, d_n + d_v, r)[:, d_n:]
        v_b = torch.einsum("hvc,c->hv", w_uv, b[:r])
        if not _negligible(v_b, float(torch.linalg.matrix_norm(w_uv).max()) * float(b[:r].norm())):
            raise ValueError(f"layer {i}: the latent's bias reaches the values (W_UV·b ≠ 0): it adds a constant "
                             "o_proj(W_UV·b) to the attention output, which DeepSeek-V3 (no o_proj bias) cannot "
                             "hold; only a bias that keys alone read cancels in softmax. Use format 'kvslim'")


def _norm_exponent(rms_bound: float) -> int:
    """``a`` (norm weight ``2^a``) for a latent whose RMS over the written width is at most ``rms_bound``.

    ``mean((s·c)²)/ε = (rms_bound/2^a)²``: 2⁻²⁴ (a 2⁻²⁵ deviation) where ``2^a ≤ 2¹⁵`` allows it, else
    2⁻²² (2⁻²³, fp32's epsilon) with ``a ≤ 15``, else 2⁻²² with a larger weight (exactness first:
    the fp16 check then reports it).
    """
    log = math.log2(max(rms_bound, 1e-30))
    a24, a22 = math.ceil(log + 12), math.ceil(log + 11)
    return a24 if a24 <= NORM_EXP_MAX else max(NORM_EXP_MAX, a22)


def _split_scale(ln: torch.Tensor, lat: torch.Tensor, big: float, lat_scale: float) -> int:
    """``b`` (input_layernorm x 2^b, q_proj and RoPE rows x 2^-b, latent rows x lat_scale·2^-b) for fp16.

    Scaling by a power of two changes a tensor's fp16 error only through underflow and overflow,
    so ``b`` is the value in ``[b_min, 0]`` (``b_min``: q_proj/RoPE rows, largest ``big``, stay
    ≤ 2¹⁵, half of fp16's range, so a bf16 rounding cannot reach inf) that minimises the worse
    of the norm weight's and the latent rows' cast errors.
    """
    b_min = min(0, math.ceil(math.log2(max(big, 1e-30) / FP16_SAFE)))
    errs = {b: max(fp16_error(ln * 2.0**b), fp16_error(lat * (lat_scale * 2.0**-b))) for b in range(b_min, 1)}
    return min(errs, key=lambda b: (errs[b], -b))


@torch.no_grad()
def deepseek_state(model, *, target: str = "transformers", head_size: int | None = None) -> tuple[dict, dict, dict]:
    """``(tensors (float64), config.json dict, report)`` of the DeepSeek-V3 export of ``model``.

    Args:
        model: kvslim Transformer of kind mla/gla/gta (converted: no latent norm, no q-LoRA).
        target: ``transformers``, ``vllm`` or ``sglang`` (shapes the target accepts, serving.py).
        head_size: ``kv_lora_rank + qk_rope_head_dim`` to pad to (serving.mla_layout).
    Raises:
        ValueError naming what the target or DeepSeek-V3 cannot compute exactly.
    """
    cfg, spec = model.config, model.spec
    check_qk_norm(spec)
    layout = mla_layout(spec, target, head_size)
    if spec.is_latent and (spec.latent_norm or spec.q_lora_rank):
        raise ValueError("format 'deepseek' export needs a converted model: no latent norm and no q-LoRA "
                         "(latent_norm=False, q_lora_rank None)")
    if cfg.mlp_bias:
        raise ValueError("DeepSeek-V3's MLP has no biases: a model with mlp_bias needs format 'kvslim'")
    mla = as_mla(model, layout)
    out_spec = layout.spec
    sd = state_dict_for_save(mla, torch.float64)
    L, r_nat, r, d_r = cfg.num_layers, layout.natural_latent, layout.latent_dim, layout.rope_dim
    _check_biases(sd, mla.spec, L)
    # 1. one eps: the residual stream scaled by lam keeps every norm's output under LATENT_NORM_EPS
    lam = math.sqrt(LATENT_NORM_EPS / cfg.rms_norm_eps)
    src = dict(sd)
    sd.update({name: src[s] * scale for name, (s, scale) in deepseek_ends(cfg).items()})
    a_all, b_all, nonlin = [], [], 0.0
    for i in range(L):
        pre = f"model.layers.{i}."
        sd[pre + "self_attn.o_proj.weight"] *= lam
        sd[pre + "mlp.down_proj.weight"] *= lam
        # 2. the exactly linear latent norm, weight 2^a
        ln, kv_a, q = sd[pre + "input_layernorm.weight"], sd[pre + "self_attn.kv_a_proj_with_mqa.weight"], \
            sd[pre + "self_attn.q_proj.weight"]
        wl = kv_a[:r_nat] * ln.abs()[None, :]
        sigma = math.sqrt(float(torch.linalg.eigvalsh(wl @ wl.T).max().clamp_min(0))) * (1 + 1e-9)
        bound = sigma * math.sqrt(ln.numel())
        a = _norm_exponent(bound / math.sqrt(r))
        s = math.sqrt(LATENT_NORM_EPS) / 2.0**a
        nonlin = max(nonlin, (s * bound) ** 2 / r / LATENT_NORM_EPS / 2)
        # 3. split s between input_layernorm (2^b; q and RoPE rows 2^-b) and the latent rows (s·2^-b)
        b = _split_scale(ln, kv_a[:r_nat], max(float(q.abs().max()), float(kv_a[r:].abs().max())), s)
        sd[pre + "input_layernorm.weight"] = ln * 2.0**b
        sd[pre + "self_attn.q_proj.weight"] = q * 2.0**-b
        sd[pre + "self_attn.kv_a_proj_with_mqa.weight"] = torch.cat([kv_a[:r] * (s * 2.0**-b), kv_a[r:] * 2.0**-b])
        sd[pre + "self_attn.kv_a_layernorm.weight"] = torch.full((r,), 2.0**a, dtype=torch.float64)
        a_all.append(a)
        b_all.append(b)
    # 4. interleaved RoPE rows (vLLM always interleaves)
    out_cfg = ModelConfig(**{**cfg.to_dict(), "attention": out_spec, "rms_norm_eps": LATENT_NORM_EPS,
                             "tie_word_embeddings": False})
    sd = permute_rope_rows(sd, out_cfg, torch.argsort(deinterleave_perm(d_r)))
    report = {
        "layout": layout, "cost": layout.cost(L), "residual_scale": lam, "source_rms_norm_eps": cfg.rms_norm_eps,
        "rms_norm_eps": LATENT_NORM_EPS, "norm_weight_log2": (min(a_all), max(a_all)),
        "input_norm_shift_log2": (min(b_all), max(b_all)), "latent_norm_nonlinearity": nonlin,
    }
    return sd, deepseek_config(cfg, layout, target), report


def deepseek_ends(cfg) -> dict[str, tuple[str, float]]:
    """``{written name: (source name, factor)}`` of the tensors outside the layers (rule 1).

    The embeddings carry the residual scale ``λ``; ``lm_head`` is always written untied, from
    the unscaled embedding when the source ties them; the final norm is unchanged.
    """
    lam = math.sqrt(LATENT_NORM_EPS / cfg.rms_norm_eps)
    emb = "model.embed_tokens.weight"
    return {emb: (emb, lam), "lm_head.weight": (emb if cfg.tie_word_embeddings else "lm_head.weight", 1.0),
            "model.norm.weight": ("model.norm.weight", 1.0)}


def deepseek_config(cfg, layout, target: str) -> dict:
    """The ``config.json`` of the DeepSeek-V3 export of a model of config ``cfg`` in ``layout``."""
    L, out_spec = cfg.num_layers, layout.spec
    lam = math.sqrt(LATENT_NORM_EPS / cfg.rms_norm_eps)
    out_cfg = ModelConfig(**{**cfg.to_dict(), "attention": out_spec, "rms_norm_eps": LATENT_NORM_EPS,
                             "tie_word_embeddings": False})
    hf = {
        "architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3", **hf_common(out_cfg),
        "num_key_value_heads": out_spec.num_heads, "kv_lora_rank": layout.latent_dim, "q_lora_rank": None,
        "qk_rope_head_dim": layout.rope_dim, "qk_nope_head_dim": out_spec.head_dim,
        "v_head_dim": out_spec.v_head_dim, "head_dim": layout.rope_dim, "first_k_dense_replace": L,
        "n_routed_experts": 1, "n_shared_experts": 1, "num_experts_per_tok": 1, "n_group": 1, "topk_group": 1,
        "moe_intermediate_size": cfg.intermediate_size, "rope_interleave": True, "attention_bias": False,
        "mlp_bias": False,
    }
    hf["kvslim_export"] = {
        "source_kind": cfg.attention.kind, "target": target, "natural_kv_lora_rank": layout.natural_latent,
        "padding_per_token": layout.padding, "residual_scale": lam, "source_rms_norm_eps": cfg.rms_norm_eps,
        "note": "kvslim convert: kv_a_layernorm is exactly linear; residual stream rescaled so rms_norm_eps = 1e-6",
    }
    return hf


def fp16_check(err: float, norm_weight_log2: tuple[int, int]) -> dict:
    """The report's fp16 verdict from the worst cast error of the written weights (``save_deepseek``)."""
    return {"fp16_cast_error": err, "fp16_ok": err <= 2.0**-9 and norm_weight_log2[1] <= NORM_EXP_MAX}


def save_deepseek(model, path, *, dtype: torch.dtype = torch.float32, target: str = "transformers",
                  head_size: int | None = None, report: dict | None = None, **write) -> Path:
    """Write ``model`` (MLA/GLA/GTA) as a DeepSeek-V3 dense checkpoint (module docstring); nothing on error.

    ``report``: a dict that receives :func:`deepseek_state`'s report (layout, cost, bounds) and the fp16
    check of the weights as written (``fp16_cast_error``: worst relative Frobenius error of casting a
    tensor to fp16; ``fp16_ok``: finite and no worse than rounding to bf16, 2⁻⁹).
    ``write``: ``tokenizer_from``, ``force``, ``sources`` of :func:`kvslim.checkpoint.write_model_dir`.
    """
    if dtype == torch.float16:
        raise ValueError("format 'deepseek' with float16: the exactly linear latent norm needs latent activations "
                         "~1e-7, below fp16's normal range, so fp16 compute is not exact; use bfloat16 or float32")
    sd, hf, info = deepseek_state(model, target=target, head_size=head_size)
    hf["torch_dtype"] = dtype_name(dtype)
    tensors = {k: v.to(dtype).contiguous() for k, v in sd.items()}
    del sd
    info.update(fp16_check(max(fp16_error(v) for v in tensors.values()), info["norm_weight_log2"]))  # as written
    if report is not None:
        report.update(info)
    return write_model_dir(path, tensors=tensors, config=hf, **write)
