"""How a tied-state model is written as a DeepSeek MLA checkpoint for one serving target.

GTA, MLA and GLA are the same computation at decode time (DESIGN.md §1), so each can be
written *exactly* as a DeepSeek-V3 MLA checkpoint that transformers, vLLM and SGLang load:

* MLA: as it is;
* GLA: the ``h_c`` latents side by side form one latent of ``h_c·d_c``; ``kv_b_proj`` is
  block-diagonal (query head h reads only its latent head's block);
* GTA: the ``h_kv`` tied states form the latent (``h_kv·d_h``); ``kv_b_proj`` is a 0/1
  selection (the key takes the first half of the head's state, the value all of it); the
  ``d_h/2`` RoPE key stays the RoPE key.

What a target accepts decides the shapes written (:func:`mla_layout`):

* ``transformers`` and ``sglang``: any ``kv_lora_rank`` and ``qk_rope_head_dim`` (SGLang's
  FlashMLA / TRT-LLM backends need 512 + 64: pass ``head_size=576``);
* ``vllm`` (0.32): its MLA backends take ``kv_lora_rank + qk_rope_head_dim`` in
  {320, 512, 576} (CPU_MLA and FlashAttn-MLA only 576 = 512 + 64), and its kernels are
  written for a 64-wide RoPE key. The latent is zero-padded up to the next accepted size
  (exact: padded channels are zero and ``kv_b_proj`` ignores them) and a narrower RoPE key
  is widened to 64 by placing its frequencies on every ``64/d_R``-th frequency of a 64-wide
  RoPE (``θ^(-2m/d_R) = θ^(-2(cm)/(c·d_R))``; the other slots are zero in q and k).

The price is cache bytes (the padding) and decode FLOPs: absorbed MLA scores every query
head against the whole latent, so GLA-as-MLA does ``h_c``× and GTA-as-MLA ``h_kv``× the
score work of the native kernels, plus the padding. :meth:`MLALayout.cost` says how much;
``kvslim convert`` prints it and ``kvslim plan --serve-as`` plans the padded shapes.
"""

from __future__ import annotations

from dataclasses import dataclass

from kvslim.spec import AttentionSpec

__all__ = ["SERVE_TARGETS", "VLLM_MLA_HEAD_SIZES", "MLALayout", "mla_layout"]

SERVE_TARGETS = ("transformers", "vllm", "sglang")
#: vLLM 0.32 ``MLACommonBackend.get_supported_head_sizes`` (kv_lora_rank + qk_rope_head_dim).
VLLM_MLA_HEAD_SIZES = (320, 512, 576)
VLLM_ROPE_DIM = 64


@dataclass(frozen=True)
class MLALayout:
    """The DeepSeek MLA shapes one kvslim spec is written with for one target."""

    source: AttentionSpec
    target: str
    latent_dim: int  # kv_lora_rank written (natural_latent + zero padding)
    rope_dim: int  # qk_rope_head_dim written (source d_R, or widened)
    nope_dim: int  # qk_nope_head_dim
    v_head_dim: int
    natural_latent: int  # latent channels that carry the model

    @property
    def head_size(self) -> int:
        """``kv_lora_rank + qk_rope_head_dim``: the cached row, what vLLM's backends check."""
        return self.latent_dim + self.rope_dim

    @property
    def padding(self) -> int:
        """Cached elements per token per layer that carry nothing (zero latent + zero RoPE slots)."""
        return self.head_size - self.source.row_dim

    @property
    def spec(self) -> AttentionSpec:
        """The written checkpoint's attention as kvslim reads it back (MLA with a latent norm)."""
        s = self.source
        return AttentionSpec(kind="mla", hidden_size=s.hidden_size, num_heads=s.num_heads, head_dim=self.nope_dim,
                             latent_dim=self.latent_dim, rope_dim=self.rope_dim, v_head_dim=self.v_head_dim,
                             rope_theta=s.rope_theta, rope_scaling=s.rope_scaling, latent_norm=True)

    def cost(self, num_layers: int = 1, dtype_bytes: int = 2) -> dict:
        """Cache bytes per token and absorbed-decode FLOPs per query head per cached token, native vs written."""
        s = self.source
        native_flops = 2 * (s.nope_dim + s.shared_rope_dim + s.state_dim)
        written_flops = 2 * (self.latent_dim + self.rope_dim + self.latent_dim)
        return {
            "kind": s.kind, "target": self.target, "head_size": self.head_size,
            "native_elems": s.row_dim, "written_elems": self.head_size, "padding_elems": self.padding,
            "native_bytes_per_token": s.row_dim * dtype_bytes * num_layers,
            "written_bytes_per_token": self.head_size * dtype_bytes * num_layers,
            "bytes_ratio": self.head_size / s.row_dim,
            "native_decode_flops": native_flops, "written_decode_flops": written_flops,
            "flops_ratio": written_flops / native_flops,
        }

    def describe(self, num_layers: int = 1, dtype_bytes: int = 2) -> str:
        c = self.cost(num_layers, dtype_bytes)
        pad = (f"zero padding {c['padding_elems']} elements/token/layer" if c["padding_elems"] else "no padding")
        return (f"written as DeepSeek MLA for {self.target}: kv_lora_rank {self.latent_dim} "
                f"({self.natural_latent} used) + qk_rope_head_dim {self.rope_dim} = {self.head_size} ({pad}); "
                f"cache {c['written_bytes_per_token']} B/token vs {c['native_bytes_per_token']} native "
                f"(x{c['bytes_ratio']:.2f}, {num_layers} layers, {dtype_bytes} B); absorbed decode "
                f"{c['written_decode_flops']} vs {c['native_decode_flops']} FLOPs per query head per cached token "
                f"(x{c['flops_ratio']:.2f})")


def _natural(spec: AttentionSpec) -> tuple[int, int, int, int]:
    """(latent, d_R, d_nope, d_v) of the exact MLA form of ``spec``."""
    if spec.kind == "mla":
        return spec.latent_dim, spec.rope_dim, spec.head_dim, spec.v_head_dim
    if spec.kind == "gla":
        return spec.num_latent_heads * spec.latent_dim, spec.rope_dim, spec.head_dim, spec.v_head_dim
    if spec.kind == "gta":
        return spec.num_kv_heads * spec.head_dim, spec.head_dim // 2, spec.head_dim // 2, spec.head_dim
    raise ValueError(f"a DeepSeek MLA checkpoint holds MLA, GLA or GTA attention, got kind {spec.kind!r}; "
                     "use format 'kvslim' (or 'hf' for GQA)")


def _widen_ok(spec: AttentionSpec) -> bool:
    rtype = (spec.rope_scaling or {}).get("rope_type", (spec.rope_scaling or {}).get("type", "default"))
    return rtype in ("default", "linear")


def mla_layout(spec: AttentionSpec, target: str = "transformers", head_size: int | None = None) -> MLALayout:
    """The shapes ``spec`` (kind mla/gla/gta) is written with for ``target``.

    Args:
        spec: the model's attention.
        target: ``transformers``, ``vllm`` or ``sglang``.
        head_size: ``kv_lora_rank + qk_rope_head_dim`` to pad to (default: none for transformers and
            sglang, the smallest of {320, 512, 576} that holds the model for vllm).
    Raises:
        ValueError naming the target's rule when the model cannot be written for it.
    """
    if target not in SERVE_TARGETS:
        raise ValueError(f"target must be one of {SERVE_TARGETS}, got {target!r}")
    if not isinstance(spec, AttentionSpec):
        raise TypeError(f"spec must be an AttentionSpec, got {type(spec).__name__}")
    if spec.rope_repeat != 1:
        raise ValueError(f"format 'deepseek' cannot hold rope_repeat={spec.rope_repeat}: DeepSeek-V3's rotary embedding "
                         "gives every RoPE dim pair its own frequency (in transformers, vLLM and SGLang alike); use "
                         "--format kvslim")
    latent, d_r, d_n, d_v = _natural(spec)
    rope = d_r
    if target == "vllm" and d_r < VLLM_ROPE_DIM:
        if d_r == 0 or VLLM_ROPE_DIM % d_r:
            raise ValueError(f"target vllm: its MLA kernels use a {VLLM_ROPE_DIM}-wide RoPE key; a d_R={d_r} key "
                             f"cannot be placed on its frequencies (d_R must divide {VLLM_ROPE_DIM})")
        if not _widen_ok(spec):
            raise ValueError(f"target vllm: widening the d_R={d_r} RoPE key to {VLLM_ROPE_DIM} is exact only "
                             f"for default or linear RoPE, not rope_scaling {spec.rope_scaling!r}")
        rope = VLLM_ROPE_DIM
    if head_size is not None:
        if not isinstance(head_size, int) or isinstance(head_size, bool) or head_size < latent + rope:
            raise ValueError(f"head_size (kv_lora_rank + qk_rope_head_dim) must be an int >= {latent + rope} "
                             f"for this {spec.kind} model ({latent} latent + {rope} RoPE), got {head_size!r}")
        if target == "vllm" and head_size not in VLLM_MLA_HEAD_SIZES:
            raise ValueError(f"target vllm: its MLA backends accept kv_lora_rank + qk_rope_head_dim in "
                             f"{VLLM_MLA_HEAD_SIZES} (CPU: 576 only), got head_size {head_size}")
    elif target == "vllm":
        fits = [h for h in VLLM_MLA_HEAD_SIZES if h >= latent + rope]
        if not fits:
            raise ValueError(f"target vllm: its MLA backends accept kv_lora_rank + qk_rope_head_dim in "
                             f"{VLLM_MLA_HEAD_SIZES}; this {spec.kind} model needs {latent} + {rope} = "
                             f"{latent + rope}")
        head_size = fits[0]
    else:
        head_size = latent + rope
    return MLALayout(source=spec, target=target, latent_dim=head_size - rope, rope_dim=rope, nope_dim=d_n,
                     v_head_dim=d_v, natural_latent=latent)
