"""Checkpoint converters: MHA->GQA (mean-pooling), GQA->MLA (TransMLA), GQA->GLA, GQA->GTA.

| target | function | file | exact when |
|---|---|---|---|
| GQA/MQA | ``mha_to_gqa`` | mha_to_gqa.py | h_kv' = h_kv |
| MLA | ``gqa_to_mla`` | latent.py | full rank + RoPE drops nothing |
| GLA | ``gqa_to_gla`` (``gqa_to_latent`` with h_c latent heads) | latent.py | same, per latent head |
| GTA | ``gqa_to_gta`` | gqa_to_gta.py | see its docstring |
| MLA/GLA/GTA as DeepSeek MLA | ``as_mla`` + ``save_deepseek`` | as_mla.py, deepseek.py | always (padding, 0/1 or block ``kv_b_proj``) |
| per-layer MLA/GLA ranks | ``rank_alloc="energy"``, ``allocate_ranks`` | ranks.py | full rank everywhere = uniform |

``convert_checkpoint`` (pipeline.py) goes from a directory to a directory; ``check_conversion``
is its one validation. By default it streams (stream.py, tensorio.py): one source layer in memory
at a time, output byte-identical to the in-memory conversion (``stream=False``). Calibration windows and moments come from calib.py
(``calib_pass="sequential"``, sequential.py: layer i calibrated on the converted layers 0..i-1); RoRoPE, FreqFold
and the rotated key basis both GTA and the latent core use from rorope.py. The writers in
export.py produce Hugging Face Llama (GQA) or kvslim checkpoints; deepseek.py the serving-safe
DeepSeek-V3 one (MLA, GLA and GTA, exact in transformers, vLLM and SGLang).
See docs/convert.md.
"""

from kvslim.convert.as_mla import as_mla
from kvslim.convert.calib import attention_input_moments, calibration_batches, calibration_tokens
from kvslim.convert.deepseek import deepseek_state
from kvslim.convert.export import save_deepseek, save_hf_llama, save_kvslim, write_checkpoint
from kvslim.convert.gqa_to_gta import gqa_to_gta
from kvslim.convert.latent import gqa_to_gla, gqa_to_latent, gqa_to_mla, max_latent_dim
from kvslim.convert.mha_to_gqa import mha_to_gqa
from kvslim.convert.pipeline import (
    ConvertResult,
    check_conversion,
    convert_checkpoint,
    convert_model,
    export_summary,
    kv_table,
)
from kvslim.convert.ranks import allocate_ranks
from kvslim.convert.rorope import Rotation, norm_selection, rorope_rotation

__all__ = [
    "ConvertResult", "Rotation", "allocate_ranks", "as_mla", "attention_input_moments", "calibration_batches", "calibration_tokens",
    "check_conversion", "convert_checkpoint", "convert_model", "deepseek_state", "export_summary", "gqa_to_gla",
    "gqa_to_gta", "gqa_to_latent", "gqa_to_mla", "kv_table", "max_latent_dim", "mha_to_gqa", "norm_selection", "rorope_rotation", "save_deepseek",
    "save_hf_llama", "save_kvslim", "write_checkpoint",
]
