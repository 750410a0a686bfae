"""Training and fine-tuning of `kvslim.model.Transformer`: one loop, two losses.

* ``loss="lm"``: next-token cross-entropy (pre-training from a spec, or plain fine-tuning);
* ``loss="distill"``: KL(teacher || student) on temperature-softened softmaxes, optionally
  over the teacher's top-k logits only (Hinton et al.; GQA paper §2 uptraining and
  TransMLA §5 recover converted checkpoints this way), optionally mixed with the LM loss.

The loop: AdamW (decay on matrices only), linear warm-up then cosine decay to ``min_lr``,
gradient clipping, gradient accumulation, bf16 autocast on CUDA, optional
``torch.compile``, periodic validation, atomic checkpoints with exact resume, a progress
bar, and ``train_log.csv`` + ``curves.png`` in the output directory.

Exact resume: the batch of step ``s`` is drawn from a generator seeded by ``(seed, s)``
alone and the schedule is a pure function of ``s``, so a run restarted from a checkpoint
(model + optimizer state + step) replays the same batches and gives the same losses as
an uninterrupted run.
"""

from __future__ import annotations

import contextlib
import csv
import json
import math
import os
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from kvslim.model import ModelConfig, Transformer
from kvslim.spec import AttentionSpec

__all__ = [
    "TrainConfig",
    "build_model",
    "distill_loss",
    "eval_ppl",
    "evaluate",
    "finetune",
    "get_batch",
    "lr_at",
    "train",
    "train_lm",
]

CHECKPOINT = "checkpoint.pt"
LOG_CSV = "train_log.csv"
CURVES_PNG = "curves.png"
LOSSES = ("lm", "distill")
DTYPES = {"auto": None, "bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# TrainConfig fields that may change between a checkpoint and its resumption
_RESUMABLE_CHANGES = {"eval_every", "eval_tokens", "save_every", "log_every", "compile", "device"}


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
        if self.dtype not in DTYPES:
            raise ValueError(f"TrainConfig.dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}")

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.seq_len * self.grad_accum

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


# ------------------------------------------------------------------- pieces
def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate of optimizer step `step` (0-based): linear warm-up, then cosine to min_lr."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    span = max(1, cfg.steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * progress))


def get_batch(
    tokens: torch.Tensor, step: int, micro: int, cfg: TrainConfig
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random windows ``x, y`` of ``[batch_size, seq_len]`` (y = x shifted by one).

    The generator is seeded from (seed, step, micro) only, so any step's batch can be
    recomputed after a restart.
    """
    n = tokens.numel() - cfg.seq_len - 1
    if n < 1:
        raise ValueError(
            f"seq_len={cfg.seq_len} needs more than {cfg.seq_len + 1} tokens, got {tokens.numel()}"
        )
    g = torch.Generator().manual_seed((cfg.seed * 1_000_003 + step) * 64 + micro)
    starts = torch.randint(0, n + 1, (cfg.batch_size,), generator=g)
    idx = starts[:, None] + torch.arange(cfg.seq_len + 1)
    w = tokens[idx]
    return w[:, :-1], w[:, 1:]


def distill_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
) -> torch.Tensor:
    """Mean over positions of T^2 * KL(p_teacher || p_student), softmaxes at temperature T.

    Args:
        student_logits, teacher_logits: ``[..., V]`` (any float dtype; computed in fp32).
        top_k: keep the teacher's k largest logits, renormalised; the student's full-vocabulary
            log-probabilities are read at those ids (the loss is still >= 0 and 0 iff the
            student matches the teacher there).
    """
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student logits {tuple(student_logits.shape)} and teacher logits "
            f"{tuple(teacher_logits.shape)} differ in shape (same vocabulary needed)"
        )
    T = float(temperature)
    s_logp = F.log_softmax(student_logits.float() / T, dim=-1)
    t = teacher_logits.float() / T
    if top_k is not None and top_k < t.shape[-1]:
        vals, idx = t.topk(top_k, dim=-1)
        t_logp = F.log_softmax(vals, dim=-1)
        s_logp = s_logp.gather(-1, idx)
    else:
        t_logp = F.log_softmax(t, dim=-1)
    kl = (t_logp.exp() * (t_logp - s_logp)).sum(-1)
    return kl.mean() * (T * T)


def build_model(
    spec: AttentionSpec,
    *,
    vocab_size: int,
    num_layers: int,
    intermediate_size: int | None = None,
    tie_word_embeddings: bool = True,
    max_position_embeddings: int = 4096,
    seed: int = 0,
) -> Transformer:
    """A freshly initialised Transformer (intermediate size default: 8/3 width, rounded up to 64)."""
    d = spec.hidden_size
    if intermediate_size is None:
        intermediate_size = -(-8 * d // 3 // 64) * 64
    cfg = ModelConfig(
        vocab_size=vocab_size,
        hidden_size=d,
        intermediate_size=intermediate_size,
        num_layers=num_layers,
        attention=spec,
        tie_word_embeddings=tie_word_embeddings,
        max_position_embeddings=max_position_embeddings,
    )
    torch.manual_seed(seed)
    return Transformer(cfg)


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but CUDA is not available")
    return dev


def _autocast(device: torch.device, dtype: str):
    dt = DTYPES[dtype]
    if dt is None:
        dt = torch.bfloat16 if device.type == "cuda" else torch.float32
    if dt == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dt)


def _check_vocab(tokens: torch.Tensor, model: Transformer, what: str) -> None:
    V = model.config.vocab_size
    if int(tokens.max()) >= V:
        raise ValueError(
            f"{what} holds token id {int(tokens.max())} >= the model's vocab_size={V} "
            "(wrong tokenizer for this model?)"
        )


# --------------------------------------------------------------- evaluation
@torch.no_grad()
def evaluate(
    model: Transformer,
    tokens: torch.Tensor,
    *,
    seq_len: int,
    batch_size: int = 8,
    max_tokens: int | None = None,
    stride: int | None = None,
    device: str | torch.device = "auto",
    dtype: str = "auto",
    teacher: Transformer | None = None,
    progress: bool = False,
) -> dict:
    """Perplexity of `model` on a token stream (`kvslim.eval.perplexity`), plus KL to a teacher.

    Returns ``{"ppl", "nll", "tokens"}`` and, with a teacher, ``"kl"``: the mean
    KL(teacher || model) per scored position over the same non-overlapping windows.
    """
    from kvslim.eval.perplexity import perplexity

    dev = resolve_device(device) if isinstance(device, str) else device
    _check_vocab(tokens if max_tokens is None else tokens[:max_tokens], model, "evaluation text")
    was_training = model.training
    model.eval()

    def logits_fn(x):
        with _autocast(dev, dtype):
            return model(x.to(dev)).float()

    out = perplexity(
        logits_fn,
        tokens,
        seq_len=seq_len,
        batch_size=batch_size,
        stride=stride,
        max_tokens=max_tokens,
        progress=progress,
    )
    if teacher is not None:
        teacher.eval()
        ids = tokens if max_tokens is None else tokens[:max_tokens]
        n = (ids.numel() // seq_len) * seq_len
        wins = ids[:n].view(-1, seq_len) if n else ids[None]
        total, count = 0.0, 0
        for i in range(0, wins.shape[0], batch_size):
            x = wins[i : i + batch_size].to(dev)
            with _autocast(dev, dtype):
                s, t = model(x), teacher(x)
            total += float(distill_loss(s, t)) * x.numel()
            count += x.numel()
        out["kl"] = total / count
    model.train(was_training)
    return out


# ---------------------------------------------------------------- the loop
def _param_groups(model: Transformer, cfg: TrainConfig) -> list[dict]:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if cfg.attention_only and ".self_attn." not in name:
            p.requires_grad_(False)
        if not p.requires_grad:
            continue
        (decay if p.dim() >= 2 else no_decay).append(p)
    if not decay and not no_decay:
        raise ValueError("no trainable parameters (attention_only on a model without attention params?)")
    return [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _save_checkpoint(path: Path, model, opt, step, cfg, history) -> None:
    state = {
        "model": model.state_dict(),
        "optimizer": opt.state_dict(),
        "step": step,
        "train_config": cfg.to_dict(),
        "model_config": model.config.to_dict(),
        "history": history,
    }
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    torch.save(state, tmp)
    os.replace(tmp, path)


def _load_checkpoint(path: Path, model, opt, cfg) -> tuple[int, dict]:
    state = torch.load(path, map_location="cpu", weights_only=False)
    if state["model_config"] != model.config.to_dict():
        raise ValueError(f"checkpoint {path} was written for another model config; use a fresh --out")
    saved = TrainConfig.from_dict(state["train_config"]).to_dict()
    diff = sorted(k for k, v in cfg.to_dict().items() if k not in _RESUMABLE_CHANGES and saved.get(k) != v)
    if diff:
        raise ValueError(
            f"cannot resume {path}: training settings differ from the checkpoint's in "
            f"{', '.join(f'{k} ({saved.get(k)!r} -> {getattr(cfg, k)!r})' for k in diff)}"
        )
    model.load_state_dict(state["model"])
    opt.load_state_dict(state["optimizer"])
    return state["step"], state["history"]


def train(
    model: Transformer,
    train_tokens: torch.Tensor,
    *,
    config: TrainConfig,
    val_tokens: torch.Tensor | None = None,
    teacher: Transformer | None = None,
    out_dir: str | os.PathLike | None = None,
    resume: bool = True,
    stop_after: int | None = None,
    eval_at_start: bool | None = None,
    progress: bool = True,
) -> dict:
    """Train `model` in place on a token stream; returns the history.

    Args:
        model: the Transformer to train (student, for distillation); moved to the device.
        train_tokens: 1-D int token stream (all ids < vocab_size).
        config: the TrainConfig.
        val_tokens: 1-D held-out stream, evaluated every ``eval_every`` steps and at the end.
        teacher: the frozen teacher for ``loss="distill"`` (same vocabulary).
        out_dir: where ``checkpoint.pt``, ``train_log.csv`` and ``curves.png`` go (None = nowhere).
        resume: continue from ``out_dir/checkpoint.pt`` if it exists.
        stop_after: stop (with a checkpoint) once this many steps are done, as if interrupted;
            the schedule still runs to ``config.steps``.
        eval_at_start: validate before the first step (default: when ``eval_every`` > 0).
        progress: show a progress bar.
    Returns:
        ``{"train": [{step, tokens, lr, loss, grad_norm, tok_per_s, elapsed_s}], "val": [{step,
        tokens, loss, ppl[, kl]}], "step": steps done, "params": trainable parameters}``.
    """
    cfg = config
    if not isinstance(model, Transformer):
        raise TypeError(f"model must be a kvslim Transformer, got {type(model).__name__}")
    train_tokens = torch.as_tensor(train_tokens).long().cpu()
    if train_tokens.dim() != 1 or train_tokens.numel() <= cfg.seq_len + 1:
        raise ValueError(
            f"train_tokens must be 1-D with more than seq_len+1={cfg.seq_len + 1} tokens, "
            f"got shape {tuple(train_tokens.shape)}"
        )
    _check_vocab(train_tokens, model, "training text")
    if cfg.loss == "distill":
        if teacher is None:
            raise ValueError("loss='distill' needs a teacher model")
        if teacher.config.vocab_size != model.config.vocab_size:
            raise ValueError(
                f"teacher vocab_size={teacher.config.vocab_size} differs from the student's "
                f"{model.config.vocab_size}"
            )
    dev = resolve_device(cfg.device)
    model.to(dev)
    if teacher is not None:
        teacher.to(dev).eval().requires_grad_(False)
    groups = _param_groups(model, cfg)
    opt = torch.optim.AdamW(
        groups, lr=cfg.lr, betas=cfg.betas, **({"fused": True} if dev.type == "cuda" else {})
    )
    out = Path(out_dir) if out_dir is not None else None
    history: dict = {"train": [], "val": []}
    start = 0
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        ck = out / CHECKPOINT
        if ck.is_file() and resume:
            start, history = _load_checkpoint(ck, model, opt, cfg)
            if progress:
                print(f"resumed from {ck} at step {start}")
    fwd = torch.compile(model) if cfg.compile else model
    params = [p for g in groups for p in g["params"]]
    n_params = sum(p.numel() for p in params)
    end = cfg.steps if stop_after is None else min(cfg.steps, stop_after)

    def validate(step):
        if val_tokens is None:
            return
        r = evaluate(
            model,
            val_tokens,
            seq_len=cfg.seq_len,
            batch_size=cfg.batch_size,
            max_tokens=cfg.eval_tokens,
            device=dev,
            dtype=cfg.dtype,
            teacher=teacher,
        )
        rec = {"step": step, "tokens": step * cfg.tokens_per_step, "loss": r["nll"], "ppl": r["ppl"]}
        if "kl" in r:
            rec["kl"] = r["kl"]
        history["val"].append(rec)
        return rec

    if eval_at_start is None:
        eval_at_start = cfg.eval_every > 0
    if start == 0 and not history["val"] and eval_at_start:
        validate(0)
    model.train()
    bar = tqdm(
        total=cfg.steps,
        initial=start,
        desc=f"train ({cfg.loss})",
        unit="step",
        disable=not progress,
        dynamic_ncols=True,
    )
    t0, tok_mark, t_mark = time.perf_counter(), start, time.perf_counter()
    elapsed0 = history["train"][-1]["elapsed_s"] if history["train"] else 0.0
    loss_acc = torch.zeros((), device=dev)
    for step in range(start, end):
        lr = lr_at(step, cfg)
        for g in opt.param_groups:
            g["lr"] = lr
        for micro in range(cfg.grad_accum):
            x, y = get_batch(train_tokens, step, micro, cfg)
            x, y = x.to(dev, non_blocking=True), y.to(dev, non_blocking=True)
            with _autocast(dev, cfg.dtype):
                logits = fwd(x)
                if cfg.loss == "lm":
                    loss = F.cross_entropy(logits.float().view(-1, logits.shape[-1]), y.reshape(-1))
                else:
                    with torch.no_grad():
                        t_logits = teacher(x)
                    loss = distill_loss(logits, t_logits, temperature=cfg.temperature, top_k=cfg.top_k)
                    if cfg.lm_weight:
                        ce = F.cross_entropy(logits.float().view(-1, logits.shape[-1]), y.reshape(-1))
                        loss = (1 - cfg.lm_weight) * loss + cfg.lm_weight * ce
            (loss / cfg.grad_accum).backward()
            loss_acc += loss.detach() / cfg.grad_accum
        if cfg.grad_clip > 0:
            gnorm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        else:
            gnorm = torch.linalg.vector_norm(
                torch.stack([p.grad.norm() for p in params if p.grad is not None])
            )
        opt.step()
        opt.zero_grad(set_to_none=True)
        done = step + 1
        if done % cfg.log_every == 0 or done == end:
            n = done - tok_mark
            loss_val = float(loss_acc) / n  # mean training loss of the steps since the last record
            now = time.perf_counter()
            rate = n * cfg.tokens_per_step / max(now - t_mark, 1e-9)
            if not math.isfinite(loss_val):
                raise FloatingPointError(f"training loss became {loss_val} at step {done}; lower the lr")
            history["train"].append(
                {
                    "step": done,
                    "tokens": done * cfg.tokens_per_step,
                    "lr": lr,
                    "loss": loss_val,
                    "grad_norm": float(gnorm),
                    "tok_per_s": rate,
                    "elapsed_s": elapsed0 + now - t0,
                }
            )
            loss_acc.zero_()
            tok_mark, t_mark = done, now
            bar.set_postfix(loss=f"{loss_val:.3f}", lr=f"{lr:.2e}", tok_s=f"{rate:,.0f}")
        if cfg.eval_every and done % cfg.eval_every == 0 and done != cfg.steps:
            rec = validate(done)
            if rec and progress:
                bar.write(
                    f"step {done}: val loss {rec['loss']:.4f} ppl {rec['ppl']:.2f}"
                    + (f" kl {rec['kl']:.4f}" if "kl" in rec else "")
                )
        if out is not None and cfg.save_every and done % cfg.save_every == 0 and done != end:
            _save_checkpoint(out / CHECKPOINT, model, opt, done, cfg, history)
        bar.update(1)
    bar.close()
    if end == cfg.steps and (not history["val"] or history["val"][-1]["step"] != end):
        validate(end)
    history["step"] = end
    history["params"] = n_params
    if out is not None:
        _save_checkpoint(out / CHECKPOINT, model, opt, end, cfg, history)
        save_curves(history, out)
    return history


# --------------------------------------------------------------- curves
def save_curves(history: dict, out_dir: str | os.PathLike) -> tuple[Path, Path]:
    """Write ``train_log.csv`` (one row per logged step, val columns where evaluated) and ``curves.png``."""
    out = Path(out_dir)
    val = {r["step"]: r for r in history["val"]}
    cols = [
        "step",
        "tokens",
        "lr",
        "loss",
        "grad_norm",
        "tok_per_s",
        "elapsed_s",
        "val_loss",
        "val_ppl",
        "val_kl",
    ]
    rows = {r["step"]: dict(r) for r in history["train"]}
    for s, r in val.items():
        row = rows.setdefault(s, {"step": s, "tokens": r["tokens"]})
        row.update(val_loss=r["loss"], val_ppl=r["ppl"], val_kl=r.get("kl"))
    csv_path = out / LOG_CSV
    with open(csv_path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        for s in sorted(rows):
            w.writerow({k: rows[s].get(k) for k in cols})
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4))
    tr = history["train"]
    if tr:
        a1.plot([r["tokens"] / 1e6 for r in tr], [r["loss"] for r in tr], label="train", lw=1)
    if history["val"]:
        v = history["val"]
        a1.plot([r["tokens"] / 1e6 for r in v], [r["loss"] for r in v], "o-", label="validation", ms=3)
        a2.plot([r["tokens"] / 1e6 for r in v], [r["ppl"] for r in v], "o-", ms=3)
        a2.set_yscale("log")
    a1.set(xlabel="tokens (M)", ylabel="loss (nats/token)", title="loss")
    a1.legend()
    a2.set(xlabel="tokens (M)", ylabel="perplexity", title="validation perplexity")
    for a in (a1, a2):
        a.grid(alpha=0.3)
    fig.tight_layout()
    png = out / CURVES_PNG
    fig.savefig(png, dpi=120)
    plt.close(fig)
    return csv_path, png


# ------------------------------------------------------- high-level entry points
def _texts_and_tokenizer(text, val_text, tokenizer, *, tokenizer_dirs=()):
    """Resolve the tokenizer (training a BPE on the training text if asked) and both streams."""
    from kvslim.eval.tokens import TOKEN_SUFFIXES, has_tokenizer, load_tokens, resolve_tokenizer, source_text

    is_ids = isinstance(text, torch.Tensor) or Path(os.fspath(text)).suffix in TOKEN_SUFFIXES
    tok = None
    if tokenizer is None:
        for d in tokenizer_dirs:
            if d is not None and has_tokenizer(d):
                tok = resolve_tokenizer(os.fspath(d))
                break
    elif isinstance(tokenizer, str) and tokenizer.startswith("bpe-") and not os.path.exists(tokenizer):
        if is_ids:
            raise ValueError(
                f"tokenizer {tokenizer!r} is trained on text, but the training data is token ids"
            )
        tok = resolve_tokenizer(tokenizer, train_text=source_text(text, default_split="calib"))
    else:
        tok = resolve_tokenizer(tokenizer)
    if tok is None and not (
        is_ids
        and (
            val_text is None
            or isinstance(val_text, torch.Tensor)
            or Path(os.fspath(val_text)).suffix in TOKEN_SUFFIXES
        )
    ):
        raise ValueError("text data needs a tokenizer: pass --tokenizer (bpe-N, smollm2 or a directory)")
    train_ids = load_tokens(text, tokenizer=tok, default_split="calib")
    val_ids = None if val_text is None else load_tokens(val_text, tokenizer=tok, default_split="eval")
    return tok, train_ids, val_ids


def _finish(model: Transformer, out: Path | None, tok, history: dict, cfg: TrainConfig) -> None:
    if out is None:
        return
    # save_pretrained replaces a whole directory atomically; write into a sibling temp dir and
    # move the files in, so that out/run (checkpoints) survives.
    tmp = out.with_name(f".{out.name}.model-{os.getpid()}")
    model.save_pretrained(tmp)
    for f in tmp.iterdir():
        os.replace(f, out / f.name)
    tmp.rmdir()
    if tok is not None:
        from kvslim.eval.tokens import save_tokenizer

        save_tokenizer(tok, out)
    (out / "train_config.json").write_text(json.dumps(cfg.to_dict(), indent=2))
    (out / "history.json").write_text(json.dumps(history, indent=1))
    save_curves(history, out)


def _run_dir(out: Path | None) -> Path | None:
    """Checkpoints and logs live in ``out/run`` so that ``out`` itself is a clean model dir."""
    return None if out is None else out / "run"


def train_lm(
    *,
    spec: AttentionSpec,
    text,
    out: str | os.PathLike | None,
    val_text=None,
    tokenizer="bpe-8192",
    num_layers: int = 6,
    intermediate_size: int | None = None,
    vocab_size: int | None = None,
    tie_word_embeddings: bool = True,
    init_seed: int | None = None,
    resume: bool = True,
    progress: bool = True,
    **train_kw,
) -> tuple[Transformer, dict]:
    """Train a new model from a spec on a text or token source (the ``kvslim train`` command).

    Args:
        spec: the attention spec (fixes the width, heads and variant).
        text: training source (corpus name, text file, .npy/.bin ids; see `kvslim.eval.tokens`).
            A bare corpus name means its non-held-out part (``sotu`` = ``sotu:calib``).
        out: output dir: the final model (config.json, model.safetensors, tokenizer files,
            train_log.csv, curves.png); checkpoints in ``out/run``.
        val_text: validation source (a bare corpus name means its held-out part).
        tokenizer: ``bpe-N``, ``smollm2``, a dir or tokenizer.json; None for token-id files.
        num_layers, intermediate_size, vocab_size, tie_word_embeddings: model shape
            (vocab_size default: the tokenizer's, else max id + 1).
        init_seed: parameter-init seed (default: the TrainConfig seed).
        **train_kw: TrainConfig fields (steps, lr, batch_size, seq_len, ...).
    """
    cfg = TrainConfig(**train_kw)
    tok, train_ids, val_ids = _texts_and_tokenizer(text, val_text, tokenizer)
    if vocab_size is None:
        from kvslim.eval.tokens import vocab_size as tok_vocab

        vocab_size = tok_vocab(tok) if tok is not None else int(train_ids.max()) + 1
    model = build_model(
        spec,
        vocab_size=vocab_size,
        num_layers=num_layers,
        intermediate_size=intermediate_size,
        tie_word_embeddings=tie_word_embeddings,
        seed=cfg.seed if init_seed is None else init_seed,
    )
    out_p = Path(out) if out is not None else None
    history = train(
        model,
        train_ids,
        config=cfg,
        val_tokens=val_ids,
        out_dir=_run_dir(out_p),
        resume=resume,
        progress=progress,
    )
    _finish(model, out_p, tok, history, cfg)
    return model, history


def _as_model(m, what: str, device) -> Transformer:
    if isinstance(m, Transformer):
        return m
    if m is None:
        raise ValueError(f"{what} is required")
    p = Path(m)
    if not (p / "config.json").is_file():
        raise ValueError(f"{what} {os.fspath(m)!r} is not a model directory (no config.json)")
    return Transformer.from_pretrained(p, device=device)


def finetune(
    *,
    model,
    text,
    out: str | os.PathLike | None = None,
    teacher=None,
    val_text=None,
    tokenizer=None,
    loss: str | None = None,
    resume: bool = True,
    progress: bool = True,
    **train_kw,
) -> tuple[Transformer, dict]:
    """Recover a converted model's quality: distil from `teacher` (or plain LM loss) on a text source.

    Args:
        model: the student (a Transformer or a model directory, kvslim or Hugging Face format).
        teacher: the original model (Transformer or directory); None = plain LM fine-tuning.
        text, val_text: training / validation sources (see `train_lm`).
        tokenizer: default: the student's directory tokenizer, else the teacher's.
        loss: ``distill`` (default when a teacher is given) or ``lm``.
        out: output model directory (checkpoints in ``out/run``); None = keep in memory only.
        **train_kw: TrainConfig fields (steps, lr, seq_len, batch_size, temperature, top_k,
            lm_weight, attention_only, ...); defaults lr=1e-4, steps=200, warmup 10 %.
    Returns (student, history); the history's ``val`` rows carry ``kl`` to the teacher.
    """
    loss = loss or ("distill" if teacher is not None else "lm")
    train_kw.setdefault("lr", 1e-4)
    train_kw.setdefault("steps", 200)
    cfg = TrainConfig(loss=loss, **train_kw)
    if loss == "distill" and teacher is None:
        raise ValueError("loss 'distill' needs a teacher (--teacher)")
    dirs = [m for m in (model, teacher) if not isinstance(m, Transformer) and m is not None]
    tok, train_ids, val_ids = _texts_and_tokenizer(text, val_text, tokenizer, tokenizer_dirs=dirs)
    dev = resolve_device(cfg.device)
    student = _as_model(model, "model (student)", dev)
    teach = _as_model(teacher, "teacher", dev) if teacher is not None else None
    out_p = Path(out) if out is not None else None
    history = train(
        student,
        train_ids,
        config=cfg,
        val_tokens=val_ids,
        teacher=teach,
        out_dir=_run_dir(out_p),
        resume=resume,
        eval_at_start=True,
        progress=progress,
    )
    _finish(student, out_p, tok, history, cfg)
    return student, history


def eval_ppl(
    *,
    model,
    texts,
    tokenizer=None,
    seq_len: int = 512,
    batch_size: int = 4,
    max_tokens: int | None = None,
    stride: int | None = None,
    device: str = "auto",
    dtype: str = "auto",
    progress: bool = True,
) -> list[dict]:
    """Perplexity of a model (Transformer or kvslim / Hugging Face directory) on several sources.

    A bare corpus name means its held-out part (``moby-dick`` = ``moby-dick:eval``).
    Returns one ``{"text", "ppl", "nll", "tokens"}`` per source.
    """
    from kvslim.eval.tokens import has_tokenizer, load_tokens, resolve_tokenizer

    if isinstance(texts, (str, os.PathLike, torch.Tensor)):
        texts = [texts]
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    dev = resolve_device(device)
    m = _as_model(model, "model", dev)
    if tokenizer is None and not isinstance(model, Transformer) and has_tokenizer(model):
        tokenizer = os.fspath(model)
    tok = resolve_tokenizer(tokenizer) if tokenizer is not None else None
    rows = []
    for t in texts:
        ids = load_tokens(t, tokenizer=tok, default_split="eval")
        r = evaluate(
            m,
            ids,
            seq_len=seq_len,
            batch_size=batch_size,
            max_tokens=max_tokens,
            stride=stride,
            device=dev,
            dtype=dtype,
            progress=progress,
        )
        rows.append({"text": t if isinstance(t, str) else "tokens", **r})
    return rows
