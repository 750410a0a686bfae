"""Distillation: KL(teacher || student) on temperature-softened softmaxes (Hinton et al.).

The GQA paper (§2, uptraining) and TransMLA (§5) recover converted checkpoints this way;
``top_k`` restricts the loss to the teacher's k largest logits.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

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
