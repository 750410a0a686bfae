"""Distillation: KL(teacher || student) on temperature-softened softmaxes (Hinton et al.).

The GQA paper (§2, uptraining) and TransMLA (§5) recover converted checkpoints this way;
``top_k`` restricts the loss to the teacher's k largest logits. :func:`chunked_distill_loss` gives the
same value from the final hidden states, a block of positions at a time: at 32k positions x 49152
vocabulary, full fp32 logits of student and teacher with their softmaxes would take tens of GB.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from kvslim.runtime import autocast


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


def chunked_distill_loss(
    student_hidden: torch.Tensor,
    teacher_hidden: torch.Tensor,
    student_head: Callable[[torch.Tensor], torch.Tensor],
    teacher_head: Callable[[torch.Tensor], torch.Tensor],
    *,
    chunk: int = 4096,
    temperature: float = 1.0,
    top_k: int | None = None,
) -> torch.Tensor:
    """``distill_loss(student_head(student_hidden), teacher_head(teacher_hidden))`` without holding the
    logits of every position at once.

    Positions are taken ``chunk`` at a time; each block's logits, softmaxes and KL are recomputed in
    the backward pass (activation checkpointing) instead of being kept, so peak memory is one block's.

    Args:
        student_hidden: ``[..., D]`` final hidden states of the student (after the last norm).
        teacher_hidden: ``[..., D']`` the teacher's, same leading shape (no gradient flows into it).
        student_head, teacher_head: hidden -> logits ``[n, V]`` (e.g. the models' ``lm_head``).
        chunk: positions per block (>= 1).
    """
    if student_hidden.shape[:-1] != teacher_hidden.shape[:-1]:
        raise ValueError(f"student hidden {tuple(student_hidden.shape)} and teacher hidden "
                         f"{tuple(teacher_hidden.shape)} differ in their leading (position) dims")
    if not isinstance(chunk, int) or chunk < 1:
        raise ValueError(f"chunk must be an int >= 1, got {chunk!r}")
    hs = student_hidden.reshape(-1, student_hidden.shape[-1])
    ht = teacher_hidden.detach().reshape(-1, teacher_hidden.shape[-1])

    def block(h, t):
        with torch.no_grad():
            t_logits = teacher_head(t)
        return distill_loss(student_head(h), t_logits, temperature=temperature, top_k=top_k) * h.shape[0]

    total = hs.new_zeros((), dtype=torch.float32)
    for s in range(0, hs.shape[0], chunk):
        h, t = hs[s : s + chunk], ht[s : s + chunk]
        total = total + (checkpoint(block, h, t, use_reentrant=False) if torch.is_grad_enabled() else block(h, t))
    return total / hs.shape[0]


@torch.no_grad()
def mean_kl(model, teacher, tokens: torch.Tensor, *, seq_len: int, batch_size: int, max_tokens: int | None,
            device: torch.device, dtype: str = "auto") -> float:
    """Mean KL(teacher || model) per position over non-overlapping ``seq_len`` windows of ``tokens``."""
    ids = tokens if max_tokens is None else tokens[:max_tokens]
    n = (ids.numel() // seq_len) * seq_len
    wins = ids[:n].view(-1, seq_len) if n else ids[None]
    was = model.training, teacher.training
    model.eval()
    teacher.eval()
    total, count = 0.0, 0
    for i in range(0, wins.shape[0], batch_size):
        x = wins[i : i + batch_size].to(device)
        with autocast(device, dtype):
            s, t = model(x), teacher(x)
        total += float(distill_loss(s, t)) * x.numel()
        count += x.numel()
    model.train(was[0])
    teacher.train(was[1])
    return total / count
