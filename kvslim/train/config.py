"""Training hyper-parameters (``TrainConfig``, saved with every checkpoint) and the LR schedule."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields

from kvslim.runtime import AUTOCAST_DTYPES

LOSSES = ("lm", "distill")
# TrainConfig fields that may change between a checkpoint and its resumption
RESUMABLE_CHANGES = {"eval_every", "eval_tokens", "save_every", "log_every", "compile", "device"}


@dataclass
class TrainConfig:
    """Hyper-parameters of one run (saved with its checkpoints).

    Args:
        steps: optimizer steps (>= 1).
        batch_size: sequences per micro-batch; tokens per step = batch_size * seq_len * grad_accum.
        seq_len: tokens per sequence (the model sees seq_len inputs, predicts seq_len targets).
        lr: peak learning rate (> 0), reached after ``warmup_steps``.
        min_lr: floor of the cosine decay (default lr / 10).
        warmup_steps: linear warm-up steps (default min(200, steps // 10)).
        weight_decay: AdamW decay on parameters with >= 2 dims (matrices, embeddings).
        betas: AdamW betas.
        grad_clip: max global gradient norm (0 = no clipping).
        grad_accum: micro-batches per step.
        loss: ``lm`` or ``distill`` (needs a teacher).
        temperature: distillation temperature T (loss scaled by T^2).
        top_k: distil over the teacher's top-k logits only (None = full vocabulary).
        lm_weight: distill only: loss = (1 - lm_weight) * KL + lm_weight * CE.
        attention_only: train only the attention parameters (everything else frozen).
        eval_every: validate every N steps (0 = only at the end).
        eval_tokens: validation tokens per evaluation (None = all).
        save_every: checkpoint every N steps (0 = only at the end).
        log_every: record the training loss every N steps.
        seed: seed of the batch order (model init is the caller's).
        compile: wrap the model in ``torch.compile``.
        dtype: autocast dtype: ``auto`` (bf16 on CUDA, fp32 on CPU), ``bf16``, ``fp16``, ``fp32``.
        device: ``auto`` (CUDA if available), ``cpu``, ``cuda``, ``cuda:1`` ...
    """

    steps: int = 1000
    batch_size: int = 16
    seq_len: int = 256
    lr: float = 1e-3
    min_lr: float | None = None
    warmup_steps: int | None = None
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 1.0
    grad_accum: int = 1
    loss: str = "lm"
    temperature: float = 1.0
    top_k: int | None = None
    lm_weight: float = 0.0
    attention_only: bool = False
    eval_every: int = 0
    eval_tokens: int | None = 131072
    save_every: int = 0
    log_every: int = 10
    seed: int = 0
    compile: bool = False
    dtype: str = "auto"
    device: str = "auto"
    extra: dict = field(default_factory=dict)  # free-form notes saved with the run

    def __post_init__(self) -> None:
        def pos_int(name, lo=1):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < lo:
                raise ValueError(f"TrainConfig.{name} must be an int >= {lo}, got {v!r}")

        for name in ("steps", "batch_size", "grad_accum", "log_every"):
            pos_int(name)
        pos_int("seq_len", 2)
        for name in ("eval_every", "save_every"):
            pos_int(name, 0)
        if not (isinstance(self.lr, (int, float)) and math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"TrainConfig.lr must be a finite number > 0, got {self.lr!r}")
        if self.min_lr is None:
            self.min_lr = self.lr / 10
        if not (0 <= self.min_lr <= self.lr):
            raise ValueError(f"TrainConfig.min_lr must be in [0, lr={self.lr}], got {self.min_lr!r}")
        if self.warmup_steps is None:
            self.warmup_steps = min(200, self.steps // 10)
        pos_int("warmup_steps", 0)
        if self.weight_decay < 0 or self.grad_clip < 0:
            raise ValueError("TrainConfig.weight_decay and grad_clip must be >= 0")
        self.betas = tuple(float(b) for b in self.betas)
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"TrainConfig.betas must be two numbers in [0, 1), got {self.betas!r}")
        if self.loss not in LOSSES:
            raise ValueError(f"TrainConfig.loss must be one of {LOSSES}, got {self.loss!r}")
        if not self.temperature > 0:
            raise ValueError(f"TrainConfig.temperature must be > 0, got {self.temperature!r}")
        if self.top_k is not None:
            pos_int("top_k")
        if not 0 <= self.lm_weight <= 1:
            raise ValueError(f"TrainConfig.lm_weight must be in [0, 1], got {self.lm_weight!r}")
        if self.eval_tokens is not None:
            pos_int("eval_tokens", 2)
        if self.dtype not in AUTOCAST_DTYPES:
            raise ValueError(f"TrainConfig.dtype must be one of {AUTOCAST_DTYPES}, got {self.dtype!r}")

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.seq_len * self.grad_accum

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate of optimizer step `step` (0-based): linear warm-up, then cosine to min_lr."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    span = max(1, cfg.steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * progress))
