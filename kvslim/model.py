"""A small Llama-like decoder whose attention is chosen by an AttentionSpec.

RMSNorm, SwiGLU, RoPE, tied or untied embeddings; parameter names follow Hugging Face
Llama (``model.layers.N.self_attn.q_proj.weight`` ...), so Llama / Mistral / Qwen2
checkpoints load by name, and MLA layers use DeepSeek's names. Checkpoints are a
directory with ``config.json`` (kvslim's, or a Hugging Face one) and safetensors.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from kvslim.attention import RMSNorm, build_attention
from kvslim.cache import KVCache, LayerCache
from kvslim.engine.sampling import check_sampling, sample
from kvslim.spec import AttentionSpec

FORMAT = "kvslim-1"


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

    def to_dict(self) -> dict:
        d = asdict(self)
        d["attention"] = self.attention.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: dict) -> ModelConfig:
        unknown = set(d) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"ModelConfig: unknown fields {sorted(unknown)}")
        return cls(**d)

    def with_attention(self, spec: AttentionSpec) -> ModelConfig:
        d = self.to_dict()
        d["attention"] = spec
        return ModelConfig(**d)


class MLP(nn.Module):
    def __init__(self, dim: int, hidden: int, bias: bool = False):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=bias)
        self.up_proj = nn.Linear(dim, hidden, bias=bias)
        self.down_proj = nn.Linear(hidden, dim, bias=bias)

    def forward(self, x):
        return self.down_proj(nn.functional.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = build_attention(cfg.attention)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg.hidden_size, cfg.intermediate_size, cfg.mlp_bias)

    def forward(self, x, positions, cache: LayerCache | None):
        x = x + self.self_attn(self.input_layernorm(x), positions, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class Backbone(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_layers))
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
        return self.config.attention

    def set_attention_options(self, *, absorb: bool | None = None, impl: str | None = None) -> None:
        """Choose the decode path of every layer: ``absorb`` (MLA/GLA) and kernel ``impl``."""
        for layer in self.model.layers:
            attn = layer.self_attn
            if absorb is not None and hasattr(attn, "absorb"):
                attn.absorb = absorb
            if impl is not None:
                attn.impl = impl

    # ---- forward -----------------------------------------------------------------
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
                  dtype: torch.dtype | None = None) -> KVCache:
        p = next(self.parameters())
        return KVCache(self.spec, self.config.num_layers, batch=batch, max_len=max_len,
                       page_size=page_size, dtype=dtype or p.dtype, device=p.device)

    @torch.no_grad()
    def generate(self, prompts, max_new_tokens: int = 32, *, temperature: float = 0.0,
                 top_k: int | None = None, top_p: float | None = None, eos_token_id: int | None = None,
                 seed: int | None = None, page_size: int | None = None) -> list[list[int]]:
        """Continue each prompt (list of token-id lists, ragged allowed) with the KV cache.

        Returns the generated ids per prompt (without the prompt), stopping at
        ``eos_token_id`` (included) or after ``max_new_tokens``.
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
        cache = self.new_cache(B, max_len, page_size=page_size)
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

    # ---- checkpoints ---------------------------------------------------------------
    def save_pretrained(self, path: str | os.PathLike, *, dtype: torch.dtype | None = None) -> None:
        """Write ``config.json`` + ``model.safetensors`` atomically (temp dir, then rename)."""
        from safetensors.torch import save_file

        sd = {k: v.detach().to(dtype or v.dtype).contiguous().cpu() for k, v in self.state_dict().items()}
        if self.config.tie_word_embeddings:
            sd.pop("lm_head.weight", None)
        cfg = {"format": FORMAT, **self.config.to_dict()}
        with atomic_dir(path) as tmp:
            save_file(sd, os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
            with open(os.path.join(tmp, "config.json"), "w") as f:
                json.dump(cfg, f, indent=2)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, *, dtype: torch.dtype | None = None,
                        device: str | torch.device = "cpu") -> Transformer:
        """Load a kvslim checkpoint or a Hugging Face Llama/Mistral/Qwen2/DeepSeek(dense) one."""
        path = Path(path)
        cfg_path = path / "config.json"
        if not cfg_path.is_file():
            raise ValueError(f"no config.json in {path}")
        raw = json.loads(cfg_path.read_text())
        if raw.get("format") == FORMAT:
            raw = {k: v for k, v in raw.items() if k != "format"}
            cfg = ModelConfig.from_dict(raw)
        else:
            cfg = config_from_hf(raw)
        sd = load_safetensors_dir(path)
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
                f"checkpoint {path} does not match the config: missing {sorted(missing)[:5]}, "
                f"unexpected {sorted(unexpected)[:5]}"
            )
        sd = {k: v for k, v in sd.items() if k in expected}
        model.load_state_dict(sd, strict=False, assign=True)
        if cfg.tie_word_embeddings:
            model.lm_head.weight = model.model.embed_tokens.weight
        for m in model.modules():  # non-persistent buffers (RoPE tables) were on meta
            if hasattr(m, "inv_freq"):
                from kvslim.rope import inv_frequencies

                m.inv_freq = inv_frequencies(m.rope_dim, cfg.attention.rope_theta, cfg.attention.rope_scaling)
        return model.to(device=device, dtype=dtype) if dtype else model.to(device)


def config_from_hf(raw: dict) -> ModelConfig:
    """ModelConfig from a Hugging Face config dict (Llama, Mistral, Qwen2, DeepSeek-V2/V3 dense)."""
    mt = raw.get("model_type")
    spec = AttentionSpec.from_hf_config(raw)
    if mt in ("deepseek_v2", "deepseek_v3"):
        if raw.get("n_routed_experts") and raw.get("first_k_dense_replace", 0) < raw["num_hidden_layers"]:
            raise ValueError("DeepSeek MoE layers are not supported: only dense (n_routed_experts null) checkpoints")
        spec = spec.replace(latent_norm=True)
    return ModelConfig(
        vocab_size=raw["vocab_size"],
        hidden_size=raw["hidden_size"],
        intermediate_size=raw["intermediate_size"],
        num_layers=raw["num_hidden_layers"],
        attention=spec,
        rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
        max_position_embeddings=int(raw.get("max_position_embeddings", 4096)),
        mlp_bias=bool(raw.get("mlp_bias", False)),
    )


def load_safetensors_dir(path: Path) -> dict:
    from safetensors.torch import load_file

    files = sorted(Path(path).glob("*.safetensors"))
    if not files:
        raise ValueError(f"no .safetensors files in {path}")
    sd = {}
    for f in files:
        sd.update(load_file(str(f)))
    return sd


class atomic_dir:
    """Context manager: yields a temp dir next to ``path``; renames it into place on success.

    On an exception (or interrupt) the temp dir is removed and ``path`` is left untouched.
    An existing ``path`` is replaced only after the new one is complete.
    """

    def __init__(self, path):
        self.path = Path(path)

    def __enter__(self) -> str:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = tempfile.mkdtemp(prefix=f".{self.path.name}.tmp-", dir=self.path.parent)
        return self.tmp

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return False
        old = None
        if self.path.exists():
            old = self.path.with_name(f".{self.path.name}.old-{os.getpid()}")
            os.replace(self.path, old)
        os.replace(self.tmp, self.path)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        return False
