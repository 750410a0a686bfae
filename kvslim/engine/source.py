"""Where a served model comes from: a checkpoint dir or a random-weight shape.

``ModelSource`` is a small picklable recipe, so every tensor-parallel / data-parallel
process can build the same model itself. Random models (``--random-model gla-2
--model-shape 1b``) have the shape of a real model for speed benchmarks. The tokenizer of a
``--model DIR`` is read by :func:`kvslim.eval.tokenizer.open_tokenizer`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from kvslim.runtime import parse_dtype

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
    """Recipe for the full model: ``path`` (checkpoint dir) or ``preset`` + ``shape`` + ``seed``.

    ``dtype`` is the dtype the model is built in; ``max_len`` the ``max_position_embeddings``
    of a random model.
    """

    path: str | None = None
    preset: str | None = None
    shape: str = "tiny"
    seed: int = 0
    dtype: str = "float32"
    max_len: int = 4096

    def __post_init__(self):
        if (self.path is None) == (self.preset is None):
            raise ValueError("give exactly one of --model DIR or --random-model PRESET")
        if self.shape not in SHAPES:
            raise ValueError(f"model shape must be one of {sorted(SHAPES)}, got {self.shape!r}")
        parse_dtype(self.dtype)

    @property
    def name(self) -> str:
        """What the API reports: the checkpoint directory's name, or ``random-<preset>``."""
        return os.path.basename(os.path.normpath(self.path)) if self.path else f"random-{self.preset}"

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


