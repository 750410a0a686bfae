"""AttentionSpec: the one object every shape in kvslim is read from.

The six variants of seed 000 (MHA, MQA, GQA, GTA, MLA, GLA) are described with the
papers' symbols (DESIGN.md §1): ``h_q`` query heads, ``d_h`` head dim, ``h_kv`` KV heads
(groups), ``d_c`` latent dim, ``h_c`` latent heads, ``d_R`` decoupled-RoPE dim.

Besides the per-variant fields, the spec derives the two views the rest of the code
needs:

* the **cache row**: what one token stores per layer (``row_dim`` elements), laid out as
  ``[K heads | V heads]`` for the separate-KV kinds and ``[state heads | rope key]`` for
  the tied-state kinds (GTA, MLA, GLA);
* the **tied-state view** (DESIGN.md §1 second table): ``S`` state heads of
  ``state_dim``, keys ``concat(state[:nope_dim], rope)``, values ``state[:v_dim]``.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from kvslim.hf_config import hf_spec_kwargs

KINDS = ("mha", "mqa", "gqa", "gta", "mla", "gla")
SEPARATE_KINDS = ("mha", "mqa", "gqa")
TIED_KINDS = ("gta", "mla", "gla")
ROPE_SCALING_TYPES = ("default", "linear", "llama3", "yarn")


def _positive(name: str, value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"AttentionSpec.{name} must be a positive int, got {value!r}")


@dataclass(frozen=True)
class AttentionSpec:
    """Shapes of one attention layer.

    Args:
        kind: one of ``mha, mqa, gqa, gta, mla, gla``.
        hidden_size: model width ``D``.
        num_heads: query heads ``h_q``.
        head_dim: ``d_h``; for MLA/GLA the per-head no-RoPE query/key dim (DeepSeek's
            ``qk_nope_head_dim``).
        num_kv_heads: ``h_kv`` for MHA/MQA/GQA/GTA (MHA: = h_q, MQA: 1). Unused for MLA/GLA.
        latent_dim: ``d_c`` per latent head (MLA/GLA only).
        num_latent_heads: ``h_c`` (MLA: 1, GLA: >= 1).
        rope_dim: ``d_R``. GQA family: rotary dims per head (default ``d_h``, i.e. full
            RoPE; smaller = partial RoPE). GTA: must be ``d_h/2``. MLA/GLA: decoupled
            RoPE key dim (DeepSeek's ``qk_rope_head_dim``).
        v_head_dim: value head dim for MLA/GLA (default ``head_dim``).
        rope_theta: RoPE base.
        rope_scaling: optional dict with ``rope_type`` in ``default, linear, llama3, yarn``
            plus that type's fields (Hugging Face format).
        rope_repeat: MLA/GLA only: each of the RoPE key's ``d_R / (2·rope_repeat)`` frequencies (the standard
            schedule for a key of ``d_R / rope_repeat`` dims) rotates ``rope_repeat`` adjacent slots, so a
            converted key keeps several KV heads' rotary components of one frequency exactly (issue 16's
            "two heads' worth of RoPE"). 1 = DeepSeek's layout; > 1 is kvslim-only (the DeepSeek export refuses it).
        q_lora_rank: optional low-rank query (MLA/GLA, DeepSeek's ``q_lora_rank``).
        latent_norm: RMS-normalise each latent head before caching (DeepSeek's
            ``kv_a_layernorm``). Converted checkpoints set it to False.
        qkv_bias: bias on the q/k/v (or kv) projections (Qwen2).
        qk_norm: per-head RMSNorm (eps ``qk_norm_eps``) of q and k before RoPE, Qwen3's ``q_norm``/``k_norm``.
            GTA/MLA/GLA (converted QK-norm sources): the row is computed from ``[k_norm(k_proj x); v_proj x]``
            (``num_kv_heads`` heads of ``head_dim``), queries are ``q_head_proj[h] q_norm(q_proj x)_h``.
    """

    kind: str
    hidden_size: int
    num_heads: int
    head_dim: int
    num_kv_heads: int | None = None
    latent_dim: int | None = None
    num_latent_heads: int | None = None
    rope_dim: int | None = None
    v_head_dim: int | None = None
    rope_theta: float = 10000.0
    rope_scaling: dict | None = field(default=None, compare=False, hash=False)
    rope_repeat: int = 1
    q_lora_rank: int | None = None
    latent_norm: bool = True
    qkv_bias: bool = False
    qk_norm: bool = False
    qk_norm_eps: float = 1e-6

    def __post_init__(self) -> None:
        kind = self.kind.lower() if isinstance(self.kind, str) else self.kind
        if kind not in KINDS:
            raise ValueError(f"AttentionSpec.kind must be one of {KINDS}, got {self.kind!r}")
        object.__setattr__(self, "kind", kind)
        for name in ("hidden_size", "num_heads", "head_dim"):
            _positive(name, getattr(self, name))
        h_q = self.num_heads
        if kind in SEPARATE_KINDS or kind == "gta":
            self._normalise_grouped(h_q)
        else:
            self._normalise_latent(h_q)
        if not (isinstance(self.rope_theta, (int, float)) and self.rope_theta > 0):
            raise ValueError(f"AttentionSpec.rope_theta must be > 0, got {self.rope_theta!r}")
        if self.rope_scaling is not None:
            if not isinstance(self.rope_scaling, dict):
                raise ValueError("AttentionSpec.rope_scaling must be a dict or None")
            rtype = self.rope_scaling.get("rope_type", self.rope_scaling.get("type", "default"))
            if rtype not in ROPE_SCALING_TYPES:
                raise ValueError(
                    f"AttentionSpec.rope_scaling.rope_type must be one of {ROPE_SCALING_TYPES}, "
                    f"got {rtype!r}"
                )
        if self.rope_scaling is not None:
            from kvslim.rope import rope_parameters

            try:
                rope_parameters(max(2, self.rope_dim), float(self.rope_theta), self.rope_scaling)
            except (KeyError, TypeError, ValueError) as e:
                raise ValueError(f"AttentionSpec.rope_scaling {self.rope_scaling!r} is invalid: {e}") from None
        _positive("rope_repeat", self.rope_repeat)
        if self.rope_repeat > 1:
            if kind not in ("mla", "gla"):
                raise ValueError(f"AttentionSpec.rope_repeat > 1 is only supported for kind mla/gla, not {kind}")
            if not self.rope_dim or self.rope_dim % (2 * self.rope_repeat):
                raise ValueError(f"AttentionSpec.rope_dim={self.rope_dim} must be a positive multiple of "
                                 f"2 * rope_repeat={2 * self.rope_repeat}")
        if self.q_lora_rank is not None:
            if kind not in ("mla", "gla"):
                raise ValueError("AttentionSpec.q_lora_rank is only supported for kind mla/gla")
            _positive("q_lora_rank", self.q_lora_rank)
        if not isinstance(self.qk_norm, bool):
            raise ValueError(f"AttentionSpec.qk_norm must be a bool, got {self.qk_norm!r}")
        eps = self.qk_norm_eps
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0 < eps < 1:
            raise ValueError(f"AttentionSpec.qk_norm_eps must be a number in (0, 1), got {eps!r}")
        if self.qk_norm and self.q_lora_rank is not None:
            raise ValueError("AttentionSpec.qk_norm and q_lora_rank cannot be combined (the query norm is per "
                             "head of q_proj's output)")

    def _normalise_grouped(self, h_q: int) -> None:
        kind = self.kind
        h_kv = self.num_kv_heads
        if kind == "mha":
            h_kv = h_q if h_kv is None else h_kv
            if h_kv != h_q:
                raise ValueError(f"AttentionSpec.num_kv_heads must equal num_heads={h_q} for mha, got {h_kv}")
        elif kind == "mqa":
            h_kv = 1 if h_kv is None else h_kv
            if h_kv != 1:
                raise ValueError(f"AttentionSpec.num_kv_heads must be 1 for mqa, got {h_kv}")
        elif h_kv is None:
            raise ValueError(f"AttentionSpec.num_kv_heads is required for kind {kind}")
        _positive("num_kv_heads", h_kv)
        if h_q % h_kv:
            raise ValueError(
                f"AttentionSpec.num_heads={h_q} must be divisible by num_kv_heads={h_kv}"
            )
        object.__setattr__(self, "num_kv_heads", h_kv)
        for name in ("latent_dim", "num_latent_heads", "v_head_dim"):
            if getattr(self, name) is not None:
                raise ValueError(f"AttentionSpec.{name} is only used by mla/gla, not {kind}")
        d_h = self.head_dim
        if kind == "gta":
            if d_h % 2:
                raise ValueError(f"AttentionSpec.head_dim must be even for gta, got {d_h}")
            rope = d_h // 2 if self.rope_dim is None else self.rope_dim
            if rope != d_h // 2:
                raise ValueError(f"AttentionSpec.rope_dim must be head_dim/2={d_h // 2} for gta, got {rope}")
        else:
            rope = d_h if self.rope_dim is None else self.rope_dim
            if not (0 <= rope <= d_h) or rope % 2:
                raise ValueError(
                    f"AttentionSpec.rope_dim must be an even number in [0, head_dim={d_h}], got {rope}"
                )
        object.__setattr__(self, "rope_dim", rope)

    def _normalise_latent(self, h_q: int) -> None:
        kind = self.kind
        if self.qk_norm:  # the normalised key heads the cache row is computed from
            if self.num_kv_heads is None:
                raise ValueError(f"AttentionSpec.num_kv_heads (the normalised key heads) is required for {kind} "
                                 "with qk_norm")
            _positive("num_kv_heads", self.num_kv_heads)
        elif self.num_kv_heads is not None:
            raise ValueError(f"AttentionSpec.num_kv_heads is not used by {kind} without qk_norm; use "
                             "num_latent_heads")
        h_c = self.num_latent_heads
        if kind == "mla":
            h_c = 1 if h_c is None else h_c
            if h_c != 1:
                raise ValueError(f"AttentionSpec.num_latent_heads must be 1 for mla, got {h_c}")
        elif h_c is None:
            raise ValueError("AttentionSpec.num_latent_heads is required for gla")
        _positive("num_latent_heads", h_c)
        if h_q % h_c:
            raise ValueError(
                f"AttentionSpec.num_latent_heads={h_c} must divide num_heads={h_q}"
            )
        if self.latent_dim is None:
            raise ValueError(f"AttentionSpec.latent_dim is required for {kind}")
        _positive("latent_dim", self.latent_dim)
        rope = self.rope_dim if self.rope_dim is not None else 0
        if not isinstance(rope, int) or rope < 0 or rope % 2:
            raise ValueError(f"AttentionSpec.rope_dim must be an even int >= 0, got {self.rope_dim!r}")
        object.__setattr__(self, "num_latent_heads", h_c)
        object.__setattr__(self, "rope_dim", rope)
        v = self.head_dim if self.v_head_dim is None else self.v_head_dim
        _positive("v_head_dim", v)
        object.__setattr__(self, "v_head_dim", v)

    @property
    def is_tied(self) -> bool:
        return self.kind in TIED_KINDS

    @property
    def is_latent(self) -> bool:
        return self.kind in ("mla", "gla")

    @property
    def m_kv(self) -> int:
        """2 for separate K and V, 1 for a tied state (seed 000 §3.1)."""
        return 1 if self.is_tied else 2

    @property
    def num_state_heads(self) -> int:
        """Heads of the cached state: h_kv for the GQA family and GTA, h_c for MLA/GLA."""
        return self.num_latent_heads if self.is_latent else self.num_kv_heads

    @property
    def group_size(self) -> int:
        """g_q: query heads served by one cached state head."""
        return self.num_heads // self.num_state_heads

    @property
    def state_dim(self) -> int:
        """Per-state-head width of the cache (d_h, or d_c for latents)."""
        return self.latent_dim if self.is_latent else self.head_dim

    @property
    def nope_dim(self) -> int:
        """Tied view: key dims taken from the state (d_h/2 for GTA, d_c for MLA/GLA)."""
        if self.kind == "gta":
            return self.head_dim // 2
        if self.is_latent:
            return self.latent_dim
        return self.head_dim

    @property
    def qk_head_dim(self) -> int:
        """Query/key dim per head in the naive (non-absorbed) computation."""
        if self.is_latent:
            return self.head_dim + self.rope_dim
        return self.head_dim

    @property
    def out_head_dim(self) -> int:
        """Per-head output dim fed to o_proj."""
        return self.v_head_dim if self.is_latent else self.head_dim

    @property
    def softmax_scale(self) -> float:
        """``1/sqrt(d_qk)``, times YaRN's ``mscale²`` when ``rope_scaling`` has ``mscale_all_dim``."""
        from kvslim.rope import softmax_mscale

        return softmax_mscale(self.rope_scaling) / math.sqrt(self.qk_head_dim)

    @property
    def shared_rope_dim(self) -> int:
        """Width of the one RoPE key shared by all heads (tied kinds), else 0."""
        return self.rope_dim if self.is_tied else 0

    @property
    def row_dim(self) -> int:
        """Elements one token stores per layer (DESIGN.md §1 table)."""
        if self.is_tied:
            return self.num_state_heads * self.state_dim + self.rope_dim
        return 2 * self.num_kv_heads * self.head_dim

    def bytes_per_token(self, dtype_bytes: int = 2) -> int:
        return self.row_dim * dtype_bytes

    def row_format(self, kv_dtype: str = "bf16", tp_size: int = 1):
        """The cache row of one rank in ``kv_dtype`` (``bf16``/``fp16``/``fp32``/``fp8``): a
        :class:`kvslim.rows.RowFormat`, whose ``row_bytes`` are the bytes/token/layer/device."""
        from kvslim.rows import RowFormat

        return RowFormat.for_spec(self, kv_dtype, tp_size)

    def duplication(self, tp_size: int) -> int:
        """D = ceil(N / state heads): how many ranks hold a copy of each state head.

        This equals seed 000's ``ceil(N g_q / h_q)``. MLA's single latent is held by all
        N ranks (D = N).
        """
        _positive("tp_size", tp_size)
        return math.ceil(tp_size / self.num_state_heads)

    def state_heads_per_rank(self, tp_size: int) -> int:
        self.check_tp(tp_size)
        return max(1, self.num_state_heads // tp_size)

    def row_dim_per_rank(self, tp_size: int) -> int:
        """Cache elements per token per layer held by one tensor-parallel rank."""
        s = self.state_heads_per_rank(tp_size)
        if self.is_tied:
            return s * self.state_dim + self.rope_dim
        return 2 * s * self.head_dim

    def shard(self, tp_size: int) -> AttentionSpec:
        """The spec of one tensor-parallel rank: h_q/N query heads and its state heads.

        State heads are split when there are at least N of them; otherwise each rank keeps
        the one state head its query heads read (duplication D > 1; MLA keeps its latent).
        """
        self.check_tp(tp_size)
        if tp_size == 1:
            return self
        h_q = self.num_heads // tp_size
        s = self.state_heads_per_rank(tp_size)
        if self.is_latent:
            return replace(self, num_heads=h_q, num_latent_heads=s)
        return replace(self, num_heads=h_q, num_kv_heads=s)

    def check_tp(self, tp_size: int) -> None:
        _positive("tp_size", tp_size)
        if self.num_heads % tp_size:
            raise ValueError(f"tp_size={tp_size} must divide num_heads={self.num_heads}")
        s = self.num_state_heads
        if s % tp_size and tp_size % s:
            raise ValueError(
                f"tp_size={tp_size} and the {s} state heads of {self.name} must divide one another"
            )

    @property
    def name(self) -> str:
        if self.kind in ("gqa", "gta"):
            return f"{self.kind}-{self.num_kv_heads}"
        if self.kind == "gla":
            return f"gla-{self.num_latent_heads}"
        return self.kind

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> AttentionSpec:
        known = set(cls.__dataclass_fields__)
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"AttentionSpec: unknown fields {sorted(unknown)}")
        return cls(**d)

    def replace(self, **kw) -> AttentionSpec:
        return replace(self, **kw)

    @classmethod
    def preset(cls, name: str, *, hidden_size: int | None = None, num_heads: int | None = None,
               head_dim: int = 128, **overrides) -> AttentionSpec:
        """Named variants of seed 000 (d_h = 128 by default).

        ``mha``, ``mqa``, ``gqa-N``, ``gta-N`` (N = h_kv), ``mla`` (d_c = 4 d_h = 512,
        d_R = d_h/2 = 64), ``gla-N`` (N = h_c latent heads of d_c = 2 d_h, d_R = d_h/2).
        Default h_q = 16 (the paper's XL-like width 2048 = 16 x 128).
        """
        key = name.lower().strip()
        h_q = 16 if num_heads is None else num_heads
        d = h_q * head_dim if hidden_size is None else hidden_size
        base = dict(hidden_size=d, num_heads=h_q, head_dim=head_dim)
        kind, _, arg = key.partition("-")
        if kind not in KINDS:
            raise ValueError(f"unknown preset {name!r}: expected one of {preset_names()}")
        if kind in ("mha", "mqa", "mla") and arg:
            raise ValueError(f"preset {kind!r} takes no '-N' suffix, got {name!r}")
        if kind in ("gqa", "gta", "gla") and (not arg.isdigit() or int(arg) <= 0):
            raise ValueError(f"preset {name!r} needs a positive head count, e.g. {kind}-4")
        if kind in ("gqa", "gta"):
            base["num_kv_heads"] = int(arg)
        elif kind == "mla":
            base.update(latent_dim=4 * head_dim, rope_dim=head_dim // 2)
        elif kind == "gla":
            base.update(num_latent_heads=int(arg), latent_dim=2 * head_dim, rope_dim=head_dim // 2)
        base.update(overrides)
        return cls(kind=kind, **base)

    @classmethod
    def from_hf_config(cls, config: Any) -> AttentionSpec:
        """Build a spec from a Hugging Face config (dict, path or PretrainedConfig): Llama / Mistral / Mixtral /
        Qwen2 / Qwen3 and DeepSeek-V2 / V3 (kvslim/hf_config.py); a bad config names its bad field."""
        return cls(**hf_spec_kwargs(config))


def preset_names() -> list[str]:
    return ["mha", "mqa", "gqa-4", "gqa-8", "gta-4", "gta-8", "mla", "gla-2", "gla-4", "gla-8"]
