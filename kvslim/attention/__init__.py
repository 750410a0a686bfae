"""Attention modules for the six variants, chosen by ``AttentionSpec.kind``.

| kind          | module                  | decode kernel          |
|---------------|-------------------------|------------------------|
| mha, mqa, gqa | GroupedQueryAttention   | ``decode_separate``    |
| gta           | GroupedTiedAttention    | ``decode_tied``        |
| mla, gla      | LatentAttention         | ``decode_tied`` (absorbed) |
"""

from kvslim.attention.base import AttentionBase
from kvslim.attention.gqa import GroupedQueryAttention
from kvslim.attention.gta import GroupedTiedAttention
from kvslim.attention.latent import LatentAttention
from kvslim.spec import AttentionSpec


def attention_class(spec: AttentionSpec) -> type[AttentionBase]:
    if spec.kind in ("mha", "mqa", "gqa"):
        return GroupedQueryAttention
    if spec.kind == "gta":
        return GroupedTiedAttention
    return LatentAttention


def build_attention(spec: AttentionSpec, *, tp_rank: int = 0, tp_size: int = 1) -> AttentionBase:
    """The attention module for ``spec`` (one tensor-parallel rank's shard when tp_size > 1)."""
    return attention_class(spec)(spec, tp_rank=tp_rank, tp_size=tp_size)


__all__ = [
    "AttentionBase", "GroupedQueryAttention", "GroupedTiedAttention", "LatentAttention",
    "attention_class", "build_attention",
]
