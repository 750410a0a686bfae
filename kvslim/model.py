"""A small Llama-like decoder whose attention is chosen by an AttentionSpec.

RMSNorm, SwiGLU, RoPE, tied or untied embeddings; parameter names follow Hugging Face
Llama (``model.layers.N.self_attn.q_proj.weight`` ...), so Llama / Mistral / Qwen2 / Qwen3
(``q_norm``/``k_norm``) checkpoints load by name, and MLA layers use DeepSeek's names. Checkpoints are a
directory with ``config.json`` (kvslim's, or a Hugging Face one) and safetensors.

Per-layer latent ranks (issue 16, non-uniform rank allocation): an MLA/GLA model may give each
layer its own ``kv_lora_rank`` (``ModelConfig.layer_ranks``); layer ``l``'s attention is built
from ``attention.replace(latent_dim=layer_ranks[l])`` (``ModelConfig.layer_spec``), and its cache
rows, pools and planned bytes follow that spec. ``attention.latent_dim`` is then the largest rank.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass

import torch
from torch import nn

from kvslim.attention import build_attention
from kvslim.cache import KVCache, LayerCache
from kvslim.checkpoint import FORMAT, load_tensors, read_config, state_dict_for_save, write_model_dir
from kvslim.hf_config import hf_int
from kvslim.layers import MLP, RMSNorm, fuse_linears
from kvslim.rope import Rotary
from kvslim.sampling import check_sampling, sample
from kvslim.spec import AttentionSpec


@dataclass
class ModelConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    attention: AttentionSpec
    rms_norm_eps: float = 1e-5
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 4096
    mlp_bias: bool = False
    layer_ranks: list[int] | None = None  # per-layer latent_dim (MLA/GLA); None = attention.latent_dim everywhere

    def __post_init__(self):
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "max_position_embeddings"):
            v = getattr(self, name)
            if not isinstance(v, int) or v <= 0:
                raise ValueError(f"ModelConfig.{name} must be a positive int, got {v!r}")
        if isinstance(self.attention, dict):
            self.attention = AttentionSpec.from_dict(self.attention)
        if self.attention.hidden_size != self.hidden_size:
            raise ValueError(
                f"ModelConfig.hidden_size={self.hidden_size} differs from attention.hidden_size="
                f"{self.attention.hidden_size}"
            )
        if self.layer_ranks is not None:
            self._check_layer_ranks()

    def _check_layer_ranks(self) -> None:
        ranks, spec = self.layer_ranks, self.attention
        _check_ranks(ranks, spec, self.num_layers)
        if max(ranks) != spec.latent_dim:
            raise ValueError(f"ModelConfig.layer_ranks: attention.latent_dim={spec.latent_dim} must be the largest "
                             f"layer rank, max(layer_ranks)={max(ranks)} (use ModelConfig.with_layer_ranks)")
        # one rank everywhere is the uniform model: one representation for it
        self.layer_ranks = None if len(set(ranks)) == 1 else list(ranks)

    def layer_spec(self, i: int) -> AttentionSpec:
        """The attention of layer ``i``: ``attention`` with that layer's latent_dim (if ranks differ)."""
        if not 0 <= i < self.num_layers:
            raise ValueError(f"layer index must be in [0, {self.num_layers}), got {i}")
        if self.layer_ranks is None:
            return self.attention
        return self.attention.replace(latent_dim=self.layer_ranks[i])

    @property
    def layer_specs(self) -> list[AttentionSpec]:
        """Every layer's attention spec, in order."""
        return [self.layer_spec(i) for i in range(self.num_layers)]

    def kv_elements_per_token(self, tp_size: int = 1) -> int:
        """Cache elements one token stores over all layers on one tensor-parallel rank."""
        return sum(s.row_dim_per_rank(tp_size) for s in self.layer_specs)

    def with_layer_ranks(self, ranks) -> ModelConfig:
        """This config with per-layer latent ranks (``attention.latent_dim`` set to the largest)."""
        ranks = list(ranks)
        _check_ranks(ranks, self.attention, self.num_layers)
        d = self.to_dict()
        d["attention"] = self.attention.replace(latent_dim=max(ranks))
        d["layer_ranks"] = ranks
        return ModelConfig(**d)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["attention"] = self.attention.to_dict()
        if d["layer_ranks"] is None:  # uniform configs read and write as before per-layer ranks existed
            del d["layer_ranks"]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> ModelConfig:
        unknown = set(d) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"ModelConfig: unknown fields {sorted(unknown)}")
        return cls(**d)

    def with_attention(self, spec: AttentionSpec, layer_ranks: list[int] | None = None) -> ModelConfig:
        """This config with another attention (and its per-layer ranks; the old ones are dropped)."""
        d = self.to_dict()
        d["attention"] = spec
        d["layer_ranks"] = layer_ranks
        return ModelConfig(**d)


def _check_ranks(ranks, spec: AttentionSpec, num_layers: int) -> None:
    if not spec.is_latent:
        raise ValueError(f"ModelConfig.layer_ranks applies to mla/gla attention (per-layer latent_dim), not {spec.kind}")
    if not isinstance(ranks, (list, tuple)) or len(ranks) != num_layers:
        raise ValueError(f"ModelConfig.layer_ranks must be a list of num_layers={num_layers} ints, got {ranks!r}")
    if any(isinstance(r, bool) or not isinstance(r, int) or r <= 0 for r in ranks):
        raise ValueError(f"ModelConfig.layer_ranks must hold positive ints, got {list(ranks)}")


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, index: int = 0):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = build_attention(cfg.layer_spec(index))
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg.hidden_size, cfg.intermediate_size, cfg.mlp_bias)

    def forward(self, x, positions, cache: LayerCache | None):
        x = x + self.self_attn(self.input_layernorm(x), positions, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class Backbone(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.model = Backbone(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.apply(self._init)

    @staticmethod
    def _init(m):
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)
            if getattr(m, "bias", None) is not None:
                nn.init.zeros_(m.bias)

    @property
    def spec(self) -> AttentionSpec:
        """The model's attention (with per-layer ranks, the largest; ``config.layer_spec(i)`` is layer i's)."""
        return self.config.attention

    def set_attention_options(self, *, absorb: bool | None = None, impl: str | None = None,
                              kv_dtype: str | None = None) -> None:
        """Choose the decode path of every layer: ``absorb`` (MLA/GLA) and kernel ``impl``.

        ``kv_dtype`` (``fp8``, ``bf16`` ...; ``"none"`` to switch off) makes a forward *without* a
        cache attend to K/V exactly as a cache of that dtype would give them back (quantized and
        dequantized), so perplexity measures what a decoder serving that cache computes.
        """
        from kvslim.rows import RowFormat

        for i, layer in enumerate(self.model.layers):
            fmt = None
            if kv_dtype is not None and kv_dtype != "none":
                fmt = RowFormat.for_spec(self.config.layer_spec(i), kv_dtype)
            attn = layer.self_attn
            if absorb is not None and hasattr(attn, "absorb"):
                attn.absorb = absorb
            if impl is not None:
                attn.impl = impl
            if kv_dtype is not None:
                attn.kv_roundtrip = fmt

    def fuse_projections(self) -> None:
        """One GEMM for the layer input's projections (q/k/v, or q + latent down-projection) and one
        for gate+up, in every layer (``kvslim.layers.fuse_linears``: same weights, same state dict).
        Call it once the model has its final device and dtype."""
        for layer in self.model.layers:
            fuse_linears(layer.self_attn, layer.self_attn.FUSE)
            fuse_linears(layer.mlp, ("gate_proj", "up_proj"))

    def forward(self, tokens: torch.Tensor, cache: KVCache | None = None, *,
                return_hidden: bool = False) -> torch.Tensor:
        """tokens ``[B, T]`` -> logits ``[B, T, V]``.

        With a cache, the tokens continue each sequence at ``cache.seq_lens`` (which may
        differ per sequence) and the cache advances by T.
        """
        if tokens.dim() != 2:
            raise ValueError(f"tokens must be [B, T], got shape {tuple(tokens.shape)}")
        B, T = tokens.shape
        start = cache.seq_lens if cache is not None else torch.zeros(B, dtype=torch.int32, device=tokens.device)
        if cache is not None and cache.block_table.shape[0] != B:
            raise ValueError(f"cache holds {cache.block_table.shape[0]} sequences, tokens have B={B}")
        positions = start.long()[:, None] + torch.arange(T, device=tokens.device)[None, :]
        if cache is not None:
            cache.check_capacity(T)
        x = self.model.embed_tokens(tokens)
        for i, layer in enumerate(self.model.layers):
            x = layer(x, positions, cache.layer(i, check_bounds=False) if cache is not None else None)
        x = self.model.norm(x)
        if cache is not None:
            cache.advance(T)
        return x if return_hidden else self.lm_head(x)

    def new_cache(self, batch: int, max_len: int, *, page_size: int | None = None,
                  dtype: torch.dtype | None = None, kv_dtype: str | None = None) -> KVCache:
        """A paged cache for ``batch`` sequences (``kv_dtype="fp8"``: packed e4m3 rows, ``kvslim.rows``)."""
        p = next(self.parameters())
        return KVCache(self.config.layer_specs, self.config.num_layers, batch=batch, max_len=max_len,
                       page_size=page_size, dtype=dtype or p.dtype, device=p.device, kv_dtype=kv_dtype)

    @torch.no_grad()
    def generate(self, prompts, max_new_tokens: int = 32, *, temperature: float = 0.0,
                 top_k: int | None = None, top_p: float | None = None, eos_token_id: int | None = None,
                 seed: int | None = None, page_size: int | None = None,
                 kv_dtype: str | None = None) -> list[list[int]]:
        """Continue each prompt (list of token-id lists, ragged allowed) with the KV cache.

        Returns the generated ids per prompt (without the prompt), stopping at
        ``eos_token_id`` (included) or after ``max_new_tokens``. ``kv_dtype="fp8"`` caches packed
        e4m3 rows (the prompt's prefill attends to the same quantized K/V).
        """
        if isinstance(prompts, torch.Tensor):
            prompts = prompts.tolist()
        if not prompts or any(len(p) == 0 for p in prompts):
            raise ValueError("generate needs at least one non-empty prompt")
        if max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
        check_sampling(temperature, top_k, top_p)
        device = next(self.parameters()).device
        gen = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
        B = len(prompts)
        max_len = max(len(p) for p in prompts) + max_new_tokens
        if max_len > self.config.max_position_embeddings:
            raise ValueError(f"prompt + max_new_tokens = {max_len} exceeds max_position_embeddings")
        cache = self.new_cache(B, max_len, page_size=page_size, kv_dtype=kv_dtype)
        last = []
        for b, p in enumerate(prompts):  # ragged prefill: one sequence at a time
            sub = cache.subset(b)
            logits = self(torch.tensor([p], device=device), sub)
            cache.seq_lens[b] = sub.seq_lens[0]
            last.append(logits[0, -1])
        logits = torch.stack(last)
        out = [[] for _ in range(B)]
        done = torch.zeros(B, dtype=torch.bool, device=device)
        for step in range(max_new_tokens):
            nxt = sample(logits, temperature=temperature, top_k=top_k, top_p=top_p, generator=gen)
            for b in range(B):
                if not done[b]:
                    out[b].append(int(nxt[b]))
            if eos_token_id is not None:
                done |= nxt == eos_token_id
            if bool(done.all()) or step == max_new_tokens - 1:
                break
            logits = self(nxt[:, None], cache)[:, -1]
        return out

    def save_pretrained(self, path: str | os.PathLike, *, dtype: torch.dtype | None = None,
                        force: bool = False, tokenizer_from: str | os.PathLike | None = None) -> None:
        """Write ``config.json`` + ``model.safetensors`` atomically (``kvslim.checkpoint``).

        An existing non-empty ``path`` is replaced only with ``force`` and only if it is a
        model directory.
        """
        write_model_dir(path, tensors=state_dict_for_save(self, dtype),
                        config={"format": FORMAT, **self.config.to_dict()}, force=force,
                        tokenizer_from=tokenizer_from)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, *, dtype: torch.dtype | None = None,
                        device: str | torch.device = "cpu") -> Transformer:
        """Load a kvslim checkpoint or a Hugging Face Llama/Mistral/Qwen2/Qwen3/DeepSeek(dense) one."""
        raw = read_config(path)
        model_config(raw)  # a bad config is named before any tensor is read
        return cls.from_state_dict(raw, load_tensors(path), dtype=dtype, device=device, source=f"checkpoint {path}")

    @classmethod
    def from_state_dict(cls, raw: dict, sd: dict[str, torch.Tensor], *, dtype: torch.dtype | None = None,
                        device: str | torch.device = "cpu", source: str = "state dict") -> Transformer:
        """A model from a config dict (kvslim's or Hugging Face's) and its tensors, checked as
        :meth:`from_pretrained` checks a directory (e.g. a GGUF read by ``kvslim.eval.smollm2``).

        ``source`` names where the tensors came from in error messages.
        """
        cfg = model_config(raw)
        sd = dict(sd)  # (the caller's dict is left as it was)
        if hf_rope_interleaved(raw):
            sd = permute_rope_rows(sd, cfg, deinterleave_perm(cfg.attention.rope_dim))
        with torch.device("meta"):
            model = cls(cfg)
        if cfg.tie_word_embeddings:
            sd.pop("lm_head.weight", None)
        expected = set(model.state_dict())
        if cfg.tie_word_embeddings:
            expected.discard("lm_head.weight")
        missing, unexpected = expected - set(sd), set(sd) - expected
        unexpected = {k for k in unexpected if not k.endswith("rotary_emb.inv_freq")}
        if missing or unexpected:
            raise ValueError(
                f"{source} does not match the config: missing {sorted(missing)[:5]}, "
                f"unexpected {sorted(unexpected)[:5]}"
            )
        shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        bad = [f"{k} {tuple(sd[k].shape)} != {shapes[k]}" for k in sorted(expected) if tuple(sd[k].shape) != shapes[k]]
        if bad:
            raise ValueError(f"{source}: tensor shapes do not match config.json: {bad[:3]}")
        sd = {k: v for k, v in sd.items() if k in expected}
        model.load_state_dict(sd, strict=False, assign=True)
        if cfg.tie_word_embeddings:
            model.lm_head.weight = model.model.embed_tokens.weight
        for m in model.modules():  # non-persistent buffers (RoPE tables) were on meta
            if isinstance(m, Rotary):
                m.reset_tables()
        return model.to(device=device, dtype=dtype) if dtype else model.to(device)


def load_model(model, *, what: str = "model", device: str | torch.device = "cpu") -> Transformer:
    """``model`` itself if it is a ``Transformer``, else the model directory it names, loaded on ``device``."""
    if isinstance(model, Transformer):
        return model
    if model is None:
        raise ValueError(f"{what} is required")
    if not os.path.isdir(os.fspath(model)):
        raise ValueError(f"{what} {os.fspath(model)!r} is not a directory")
    if not os.path.isfile(os.path.join(os.fspath(model), "config.json")):
        raise ValueError(f"{what} {os.fspath(model)!r} is not a model directory (no config.json)")
    return Transformer.from_pretrained(model, device=device)


def hf_rope_interleaved(raw: dict) -> bool:
    """Whether a Hugging Face DeepSeek checkpoint rotates interleaved pairs ``(x0, x1), (x2, x3) …``.

    DeepSeek-V2 always does; V3 unless ``rope_interleave`` is false (its default is true).
    kvslim rotates ``rotate_half`` pairs ``(x_i, x_{i+r/2})``, so such weights are permuted at load.
    """
    mt = raw.get("model_type")
    return mt == "deepseek_v2" or (mt == "deepseek_v3" and raw.get("rope_interleave", True) is not False)


def deinterleave_perm(rope_dim: int) -> torch.Tensor:
    """Row order taking interleaved RoPE pairs to rotate_half ones: ``[0, 2, 4, …, 1, 3, 5, …]``."""
    return torch.cat([torch.arange(0, rope_dim, 2), torch.arange(1, rope_dim, 2)])


def permute_rope_rows(sd: dict, cfg: ModelConfig, perm: torch.Tensor) -> dict:
    """Reorder the RoPE rows of an MLA state dict (query heads' RoPE part, the shared RoPE key) by ``perm``.

    Scores are unchanged when queries and keys are permuted alike; only the pairing RoPE uses
    changes. ``deinterleave_perm`` reads interleaved checkpoints; its inverse writes them.
    """
    spec = cfg.attention
    d_n, d_r = spec.head_dim, spec.rope_dim
    out = dict(sd)
    for i in range(cfg.num_layers):
        pre = f"model.layers.{i}.self_attn."
        for name in ("q_proj", "q_b_proj"):
            for kind in ("weight", "bias"):
                key = f"{pre}{name}.{kind}"
                if key in out:
                    w = out[key].view(spec.num_heads, d_n + d_r, *out[key].shape[1:])
                    w = torch.cat([w[:, :d_n], w[:, d_n:][:, perm]], 1)
                    out[key] = w.reshape(out[key].shape).contiguous()
        for kind in ("weight", "bias"):
            key = f"{pre}kv_a_proj_with_mqa.{kind}"
            if key in out:
                w = out[key]
                out[key] = torch.cat([w[: w.shape[0] - d_r], w[w.shape[0] - d_r :][perm]]).contiguous()
    return out


def model_config(raw: dict) -> ModelConfig:
    """The ModelConfig of a ``config.json`` dict: kvslim's own format, else a Hugging Face one."""
    if raw.get("format") == FORMAT:
        return ModelConfig.from_dict({k: v for k, v in raw.items() if k != "format"})
    return config_from_hf(raw)


def config_from_hf(raw: dict) -> ModelConfig:
    """ModelConfig from a Hugging Face config dict (Llama, Mistral, Qwen2, Qwen3, DeepSeek-V2/V3 dense).

    Every field is type-checked (a bad config names its bad field); architectures whose
    non-attention parts kvslim's model does not have (MoE MLPs) are refused.
    """
    mt = raw.get("model_type")
    spec = AttentionSpec.from_hf_config(raw)
    layers = hf_int(raw, "num_hidden_layers")
    if mt == "mixtral":
        raise ValueError("Mixtral's mixture-of-experts MLP is not supported by kvslim's model "
                         "(`kvslim plan` reads its attention; `convert` needs a dense model)")
    if mt in ("deepseek_v2", "deepseek_v3"):
        first_dense = hf_int(raw, "first_k_dense_replace", default=0, minimum=0)
        if raw.get("n_routed_experts") and first_dense < layers:
            raise ValueError("DeepSeek MoE layers are not supported: only dense (n_routed_experts null) checkpoints")
        spec = spec.replace(latent_norm=True)
    eps = raw.get("rms_norm_eps", 1e-6)
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0 < eps < 1:
        raise ValueError(f"HF config: 'rms_norm_eps' must be a number in (0, 1), got {eps!r}")
    return ModelConfig(
        vocab_size=hf_int(raw, "vocab_size"),
        hidden_size=spec.hidden_size,
        intermediate_size=hf_int(raw, "intermediate_size"),
        num_layers=layers,
        attention=spec,
        rms_norm_eps=float(eps),
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
        max_position_embeddings=hf_int(raw, "max_position_embeddings", default=4096),
        mlp_bias=bool(raw.get("mlp_bias", False)),
    )
