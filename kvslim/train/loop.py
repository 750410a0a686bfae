"""The training loop shared by ``kvslim train`` and ``kvslim finetune``.

AdamW (decay on matrices only), linear warm-up then cosine decay to ``min_lr``, gradient
clipping, gradient accumulation, bf16 autocast on CUDA, optional ``torch.compile``, periodic
validation (perplexity, and KL to the teacher when distilling), checkpoints with exact resume,
a progress bar.

Exact resume: the batch of step ``s`` is drawn from a generator seeded by ``(seed, s)``
alone and the schedule is a pure function of ``s``, so a run restarted from a checkpoint
(model + optimizer state + step) replays the same batches and gives the same losses as an
uninterrupted run.

Under ``torchrun`` the same loop runs data-parallel with FSDP2 (``dist.py``): ``batch_size`` is
the global batch, each rank trains on its slice, rank 0 writes the checkpoints.
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from kvslim.eval.perplexity import check_vocab, model_perplexity
from kvslim.model import Transformer
from kvslim.runtime import autocast
from kvslim.train import dist
from kvslim.train.config import RESUMABLE_CHANGES, TrainConfig, lr_at
from kvslim.train.curves import save_curves
from kvslim.train.distill import distill_loss, mean_kl

CHECKPOINT = "checkpoint.pt"


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


def _freeze(model: Transformer, cfg: TrainConfig) -> None:
    """``attention_only``: everything but the attention parameters stops requiring gradients."""
    if cfg.attention_only:
        for name, p in model.named_parameters():
            if ".self_attn." not in name:
                p.requires_grad_(False)


def _param_groups(model: Transformer, cfg: TrainConfig) -> list[dict]:
    decay, no_decay = [], []
    for p in model.parameters():
        if not p.requires_grad:
            continue
        (decay if p.dim() >= 2 else no_decay).append(p)
    if not decay and not no_decay:
        raise ValueError("no trainable parameters (attention_only on a model without attention params?)")
    return [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _save_checkpoint(path: Path, model, opt, step, cfg, history, launch: dist.Launch) -> None:
    """Write ``path`` atomically; under FSDP every rank gathers, rank 0 writes (same format)."""
    model_state = dist.full_model_state(model, launch)
    optim_state = dist.full_optim_state(model, opt, launch)
    if not launch.main:
        return
    state = {
        "model": model_state,
        "optimizer": optim_state,
        "step": step,
        "train_config": cfg.to_dict(),
        "model_config": model.config.to_dict(),
        "history": history,
    }
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    torch.save(state, tmp)
    os.replace(tmp, path)


def _read_checkpoint(path: Path, model, cfg) -> dict:
    state = torch.load(path, map_location="cpu", weights_only=False)
    if state["model_config"] != model.config.to_dict():
        raise ValueError(f"checkpoint {path} was written for another model config; use a fresh --out")
    saved = TrainConfig.from_dict(state["train_config"]).to_dict()
    diff = sorted(k for k, v in cfg.to_dict().items() if k not in RESUMABLE_CHANGES and saved.get(k) != v)
    if diff:
        raise ValueError(
            f"cannot resume {path}: training settings differ from the checkpoint's in "
            f"{', '.join(f'{k} ({saved.get(k)!r} -> {getattr(cfg, k)!r})' for k in diff)}"
        )
    return state


def _load_checkpoint(path: Path, model, opt, cfg, launch: dist.Launch) -> tuple[int, dict]:
    """Rank 0 reads and checks ``path``; the step and history reach every rank, the tensors the shards."""
    state = dist.on_rank0(lambda: _read_checkpoint(path, model, cfg), launch, share=False)
    step, history = dist.on_rank0(lambda: (state["step"], state["history"]), launch)
    dist.load_full_state(model, opt, state and state["model"], state and state["optimizer"], launch)
    return step, history


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

    Under ``torchrun`` (``WORLD_SIZE`` > 1) the model is sharded with FSDP2 in place and trained
    data-parallel (``kvslim.train.dist``): ``batch_size`` is the global batch, the history is the
    same on every rank (validation runs in full on each), only rank 0 writes to ``out_dir``.
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
    check_vocab(train_tokens, model, "training text")
    if cfg.loss == "distill":
        if teacher is None:
            raise ValueError("loss='distill' needs a teacher model")
        if teacher.config.vocab_size != model.config.vocab_size:
            raise ValueError(
                f"teacher vocab_size={teacher.config.vocab_size} differs from the student's "
                f"{model.config.vocab_size}"
            )
    launch = dist.setup(cfg)  # torchrun: validate the launch, start the process group
    dev = launch.device
    progress = progress and launch.main
    model.to(dev)
    if teacher is not None:
        # The teacher is replicated, not sharded: it has no gradients or optimizer state, so
        # sharding would save only one copy of its weights per rank, at the price of an
        # all-gather per layer per micro-batch; a replica costs no communication at all.
        teacher.to(dev).eval().requires_grad_(False)
    _freeze(model, cfg)  # before sharding: FSDP2 keeps each parameter's requires_grad
    dist.shard(model, launch)
    groups = _param_groups(model, cfg)
    opt = torch.optim.AdamW(
        groups, lr=cfg.lr, betas=cfg.betas, **({"fused": True} if dev.type == "cuda" else {})
    )
    out = Path(out_dir) if out_dir is not None else None
    history: dict = {"train": [], "val": []}
    start = 0
    if out is not None:
        if launch.main:
            out.mkdir(parents=True, exist_ok=True)
        ck = out / CHECKPOINT
        if resume and dist.on_rank0(ck.is_file, launch):
            start, history = _load_checkpoint(ck, model, opt, cfg, launch)
            if progress:
                print(f"resumed from {ck} at step {start}")
    fwd = torch.compile(model) if cfg.compile else model
    params = [p for g in groups for p in g["params"]]
    n_params = sum(p.numel() for p in params)
    end = cfg.steps if stop_after is None else min(cfg.steps, stop_after)

    def validate(step):
        if val_tokens is None:
            return
        kw = dict(seq_len=cfg.seq_len, batch_size=cfg.batch_size, max_tokens=cfg.eval_tokens, device=dev,
                  dtype=cfg.dtype)
        r = model_perplexity(model, val_tokens, **kw)
        rec = {"step": step, "tokens": step * cfg.tokens_per_step, "loss": r["nll"], "ppl": r["ppl"]}
        if teacher is not None:
            rec["kl"] = mean_kl(model, teacher, val_tokens, **kw)
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
            x, y = get_batch(train_tokens, step, micro, cfg)  # the global batch; this rank's rows:
            x, y = (dist.local_rows(t, launch).to(dev, non_blocking=True) for t in (x, y))
            with autocast(dev, cfg.dtype):
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
        # the global norm: under FSDP the gradients are DTensor shards and the norm is reduced over ranks
        if cfg.grad_clip > 0:
            gnorm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        else:
            gnorm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
        opt.step()
        opt.zero_grad(set_to_none=True)
        done = step + 1
        if done % cfg.log_every == 0 or done == end:
            n = done - tok_mark
            # mean training loss of the steps since the last record (over all ranks' slices)
            loss_val = float(dist.mean_over_ranks(loss_acc, launch)) / n
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
                    "grad_norm": float(dist.full_value(gnorm)),
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
            _save_checkpoint(out / CHECKPOINT, model, opt, done, cfg, history, launch)
        bar.update(1)
    bar.close()
    if end == cfg.steps and (not history["val"] or history["val"][-1]["step"] != end):
        validate(end)
    history["step"] = end
    history["params"] = n_params
    if out is not None:
        _save_checkpoint(out / CHECKPOINT, model, opt, end, cfg, history, launch)
        if launch.main:
            save_curves(history, out)
    return history
