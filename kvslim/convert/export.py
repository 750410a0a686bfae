"""Writing converted models: DeepSeek-V3 (MLA, GLA, GTA), Hugging Face Llama (GQA) or kvslim's format.

All writes go through :func:`kvslim.checkpoint.write_model_dir`: weights, config and the
source's tokenizer files land in a hidden directory that replaces the output only when
complete, so a failed or interrupted conversion never leaves a half-written checkpoint.
The DeepSeek-V3 writer (serving-safe: one file exact in transformers, vLLM and SGLang) is in
deepseek.py.
"""

from __future__ import annotations

from pathlib import Path

import torch

from kvslim.checkpoint import FORMAT, state_dict_for_save, write_model_dir
from kvslim.convert.deepseek import LATENT_NORM_EPS, hf_common, save_deepseek

__all__ = ["LATENT_NORM_EPS", "hf_llama_config", "kvslim_config", "save_deepseek", "save_hf_llama", "save_kvslim",
           "write_checkpoint"]

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def kvslim_config(cfg) -> dict:
    """The ``config.json`` of kvslim's format for a model of config ``cfg``."""
    return {"format": FORMAT, **cfg.to_dict()}


def hf_llama_config(cfg, dtype: torch.dtype = torch.float32) -> dict:
    """The Hugging Face Llama ``config.json`` of a GQA/MQA/MHA model; ValueError if Llama cannot hold it."""
    spec = cfg.attention
    if spec.kind not in ("mha", "mqa", "gqa") or spec.rope_dim != spec.head_dim or spec.qkv_bias or cfg.mlp_bias:
        raise ValueError("format 'hf' (Llama) needs a full-RoPE MHA/MQA/GQA model without biases; use format 'kvslim'")
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", **hf_common(cfg, dtype),
            "num_key_value_heads": spec.num_kv_heads, "head_dim": spec.head_dim, "attention_bias": False,
            "mlp_bias": False}


def save_kvslim(model, path, *, dtype: torch.dtype = torch.float32, **write) -> Path:
    """kvslim's own format (loadable by ``Transformer.from_pretrained``), any attention kind.

    ``write``: ``tokenizer_from``, ``force``, ``sources`` of :func:`kvslim.checkpoint.write_model_dir`.
    """
    return write_model_dir(path, tensors=state_dict_for_save(model, dtype), config=kvslim_config(model.config),
                           **write)


def save_hf_llama(model, path, *, dtype: torch.dtype = torch.float32, **write) -> Path:
    """A GQA/MQA/MHA model as a Hugging Face Llama checkpoint (same weight names)."""
    hf = hf_llama_config(model.config, dtype)
    return write_model_dir(path, tensors=state_dict_for_save(model, dtype), config=hf, **write)


def write_checkpoint(model, path, *, fmt: str, dtype: torch.dtype = torch.float32, target: str = "transformers",
                     head_size: int | None = None, report: dict | None = None, **write) -> Path:
    """Write ``model`` in format ``deepseek``, ``hf`` or ``kvslim`` (``write``: see :func:`save_kvslim`).

    ``target``, ``head_size``, ``report``: the DeepSeek writer's (:func:`save_deepseek`); other formats
    take none of them.
    """
    writers = {"deepseek": save_deepseek, "hf": save_hf_llama, "kvslim": save_kvslim}
    if fmt not in writers:
        raise ValueError(f"format must be one of {sorted(writers)}, got {fmt!r}")
    if fmt == "deepseek":
        return save_deepseek(model, path, dtype=dtype, target=target, head_size=head_size, report=report, **write)
    if target != "transformers" or head_size is not None:
        raise ValueError(f"--target/--mla-head-size apply to format 'deepseek' only, not {fmt!r}")
    return writers[fmt](model, path, dtype=dtype, **write)
