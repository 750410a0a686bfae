"""Checkpoint converters: MHA->GQA (mean-pooling), GQA->MLA (TransMLA), GQA->GLA, GQA->GTA.

| target | function | file | exact when |
|---|---|---|---|
| GQA/MQA | ``mha_to_gqa`` | mha_to_gqa.py | h_kv' = h_kv |
| MLA | ``gqa_to_mla`` | gqa_to_mla.py | full rank + RoPE drops nothing |
| GLA | ``gqa_to_latent(latent_heads=h_c)`` | gqa_to_mla.py | same, per latent head |
| GTA | ``gqa_to_gta`` | gqa_to_gta.py | see its docstring |

``convert_checkpoint`` (pipeline.py) goes from a directory to a directory; the writers in
export.py produce DeepSeek-V3 (MLA), Hugging Face Llama (GQA) or kvslim checkpoints.
See docs/convert.md.
"""

from kvslim.convert.calib import attention_input_moments, calibration_tokens
from kvslim.convert.export import save_deepseek, save_hf_llama, save_kvslim, write_checkpoint
from kvslim.convert.gqa_to_gla import gqa_to_gla
from kvslim.convert.gqa_to_gta import gqa_to_gta
from kvslim.convert.gqa_to_mla import gqa_to_latent, gqa_to_mla, max_latent_dim
from kvslim.convert.mha_to_gqa import mha_to_gqa
from kvslim.convert.pipeline import ConvertResult, convert_checkpoint, convert_model, kv_table
from kvslim.convert.rorope import Rotation, norm_selection, rorope_rotation

__all__ = [
    "ConvertResult", "Rotation", "attention_input_moments", "calibration_tokens", "convert_checkpoint",
    "convert_model", "gqa_to_gla", "gqa_to_gta", "gqa_to_latent", "gqa_to_mla", "kv_table", "max_latent_dim", "mha_to_gqa",
    "norm_selection", "rorope_rotation", "save_deepseek", "save_hf_llama", "save_kvslim", "write_checkpoint",
]
