"""Where a served model comes from: a checkpoint dir or a random-weight shape, plus its tokenizer.

``ModelSource`` is a small picklable recipe, so every tensor-parallel / data-parallel
process can build the same model itself. Random models (``--random-model gla-2
--model-shape 1b``) have the shape of a real model for speed benchmarks.

Tokenizers: a ``--model DIR`` with tokenizer files is read with
``transformers.AutoTokenizer`` (chat template included) or, failing that, the
``tokenizers`` library. Without a chat template, chats are rendered with
:func:`render_simple_chat` (documented in docs/engine.md).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

#: model shapes for random-weight models: hidden, layers, heads, head_dim, intermediate, vocab
SHAPES = {
    "tiny": dict(hidden=64, layers=2, heads=4, head_dim=16, inter=128, vocab=97),
    "tiny16": dict(hidden=256, layers=2, heads=16, head_dim=16, inter=256, vocab=97),  # TP 4/8 tests
    "small": dict(hidden=512, layers=8, heads=8, head_dim=64, inter=1536, vocab=32000),
    "1b": dict(hidden=2048, layers=24, heads=16, head_dim=128, inter=5632, vocab=32000),
    # DeepSeek-V3's attention width (128 query heads of 128, d 7168, dense MLP 18432) at 16
    # layers: the shape of the paper's TP runs (issue #8); 11.9 B parameters (24 GB in bf16)
    "paper": dict(hidden=7168, layers=16, heads=128, head_dim=128, inter=18432, vocab=32000),
}

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


def parse_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {name!r}")
    return DTYPES[name]


def random_model(preset: str, shape: str = "tiny", *, seed: int = 0, max_len: int = 4096,
                 device: str | torch.device = "cpu"):
    """A Transformer with random weights: attention ``preset`` (e.g. gla-2) at a named ``shape``.

    Weights are drawn on ``device`` (fast for large shapes); the same seed and device type
    give the same weights in every process (tensor-parallel ranks rely on it).
    """
    from kvslim.model import ModelConfig, Transformer
    from kvslim.spec import AttentionSpec

    if shape not in SHAPES:
        raise ValueError(f"model shape must be one of {sorted(SHAPES)}, got {shape!r}")
    s = SHAPES[shape]
    spec = AttentionSpec.preset(preset, num_heads=s["heads"], head_dim=s["head_dim"], hidden_size=s["hidden"])
    cfg = ModelConfig(vocab_size=s["vocab"], hidden_size=s["hidden"], intermediate_size=s["inter"],
                      num_layers=s["layers"], attention=spec, max_position_embeddings=max_len)
    torch.manual_seed(seed)
    with torch.device(device):
        model = Transformer(cfg).eval()
    with torch.no_grad():  # non-trivial norm weights (as in kvslim.testing)
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.1 * torch.randn_like(p))
    return model


@dataclass(frozen=True)
class ModelSource:
    """Recipe for the full model: ``path`` (checkpoint dir) or ``preset`` + ``shape`` + ``seed``."""

    path: str | None = None
    preset: str | None = None
    shape: str = "tiny"
    seed: int = 0
    dtype: str = "float32"
    max_len: int = 4096

    def __post_init__(self):
        if (self.path is None) == (self.preset is None):
            raise ValueError("give exactly one of --model DIR or --random-model PRESET")
        parse_dtype(self.dtype)

    def build(self, device: str | torch.device = "cpu"):
        """The full (unsharded) model on ``device`` in ``dtype``, eval mode."""
        from kvslim.model import Transformer

        if self.path is not None:
            if not os.path.isdir(self.path):
                raise ValueError(f"--model {self.path!r} is not a directory")
            model = Transformer.from_pretrained(self.path)
        else:
            model = random_model(self.preset, self.shape, seed=self.seed, max_len=self.max_len, device=device)
        return model.to(device=device, dtype=parse_dtype(self.dtype)).eval()


class Tokenizer:
    """encode/decode/chat over a Hugging Face tokenizer (``transformers`` or ``tokenizers``)."""

    def __init__(self, tok, *, eos_token_id: int | None, chat_template: bool, backend: str):
        self.tok, self.eos_token_id, self.has_chat_template, self.backend = tok, eos_token_id, chat_template, backend

    def encode(self, text: str) -> list[int]:
        if self.backend == "transformers":
            return list(self.tok(text, add_special_tokens=True)["input_ids"])
        return list(self.tok.encode(text).ids)

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=True)

    def chat(self, messages: list[dict]) -> list[int]:
        if self.has_chat_template:
            out = self.tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
            if hasattr(out, "keys"):  # transformers >= 5 returns a BatchEncoding
                out = out["input_ids"]
            return [int(t) for t in out]
        return self.encode(render_simple_chat(messages))


def render_simple_chat(messages: list[dict]) -> str:
    """The fallback chat format: ``<|role|>\\ncontent\\n`` per message, then ``<|assistant|>\\n``."""
    return "".join(f"<|{m['role']}|>\n{m['content']}\n" for m in messages) + "<|assistant|>\n"


def load_tokenizer(path: str) -> Tokenizer | None:
    """The tokenizer in ``path`` (None if it has no tokenizer files)."""
    has_files = any(os.path.isfile(os.path.join(path, f)) for f in
                    ("tokenizer.json", "tokenizer_config.json", "tokenizer.model"))
    if not has_files:
        return None
    try:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(path)
        return Tokenizer(tok, eos_token_id=tok.eos_token_id, chat_template=bool(getattr(tok, "chat_template", None)),
                         backend="transformers")
    except ImportError:
        pass
    from tokenizers import Tokenizer as RawTokenizer

    file = os.path.join(path, "tokenizer.json")
    if not os.path.isfile(file):
        raise ValueError(f"{path}: without transformers, a tokenizer.json is needed")
    return Tokenizer(RawTokenizer.from_file(file), eos_token_id=None, chat_template=False, backend="tokenizers")
