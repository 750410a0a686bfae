"""Perplexity of any causal LM given as a logits function, and tokenization helpers.

Used to report quality before/after a conversion (GQA paper §4, TransMLA §5: perplexity on
held-out text). The model is any callable `logits_fn(tokens [B, T] int64) -> logits [B, T, V]`
(a Hugging Face model via `hf_logits_fn`, or kvslim's own `model(tokens)`), so the same
numbers come out for both.

Chunking. By default (`stride=None`) the token stream is cut into **non-overlapping** windows
of `seq_len` tokens; inside each window token t is predicted from tokens 0..t-1 of the same
window, and each window's first token is context only (never scored). This is the cheap,
common protocol; its numbers are higher than sliding-window ones because early tokens of a
window see little context. With `stride < seq_len` windows start every `stride` tokens and each
scores only the tokens no earlier window scored, so every token after the first is scored
exactly once with at least `seq_len - stride` tokens of context (the Hugging Face "perplexity
of fixed-length models" protocol). Log-likelihoods are summed in float64.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from kvslim.runtime import AUTOCAST_DTYPES, autocast, resolve_device

__all__ = ["eval_ppl", "hf_logits_fn", "model_perplexity", "perplexity"]

LogitsFn = Callable[[torch.Tensor], torch.Tensor]


def _as_token_ids(token_ids, field: str = "token_ids") -> torch.Tensor:
    if isinstance(token_ids, torch.Tensor):
        t = token_ids
    else:
        try:
            t = torch.as_tensor(token_ids)
        except (TypeError, ValueError) as e:
            raise TypeError(
                f"{field} must be a 1-D sequence of integer token ids, got {type(token_ids)}"
            ) from e
    if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
        raise TypeError(f"{field} must hold integer token ids, got dtype {t.dtype}")
    if t.dim() != 1:
        raise ValueError(f"{field} must be 1-D [num_tokens], got shape {tuple(t.shape)}")
    if t.numel() and int(t.min()) < 0:
        raise ValueError(f"{field} must be non-negative token ids, got min {int(t.min())}")
    return t.to(torch.long).cpu()


def _windows(n: int, seq_len: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, end, first_scored) windows; a target (position >= 1) is scored at most once.

    With stride == seq_len each window's first token is context only, so targets at
    multiples of seq_len are skipped; with stride < seq_len every target 1..n-1 is scored.
    """
    out, scored_to = [], 1  # targets [1, scored_to) are already scored
    begin = 0
    while begin + 1 < n:
        end = min(begin + seq_len, n)
        first = max(scored_to, begin + 1)
        if first < end:
            out.append((begin, end, first))
            scored_to = end
        if end == n:
            break
        begin += stride
    return out


@torch.no_grad()
def perplexity(
    logits_fn: LogitsFn,
    token_ids: torch.Tensor | Sequence[int],
    *,
    seq_len: int = 512,
    batch_size: int = 4,
    stride: int | None = None,
    max_tokens: int | None = None,
    progress: bool = True,
) -> dict:
    """Perplexity of `logits_fn` on a token stream.

    Args:
        logits_fn: callable mapping `tokens` LongTensor [B, T] to logits [B, T, V] (any float
            dtype, any device; tokens arrive on CPU, so wrap GPU models, e.g.
            `hf_logits_fn(model, "cuda")`). Position t's logits predict token t+1.
        token_ids: 1-D int tensor / sequence [N], N >= 2.
        seq_len: window length T (>= 2).
        batch_size: windows per `logits_fn` call (>= 1); windows of unequal length (the last
            one) go in their own call.
        stride: None = seq_len (non-overlapping windows); 1 <= stride <= seq_len for a sliding
            window where each token is scored once (see module docstring).
        max_tokens: use only the first `max_tokens` tokens (>= 2); None = all.
        progress: show a tqdm progress bar.
    Returns:
        {"ppl": exp(nll), "nll": mean negative log-likelihood in nats/token (float64),
         "tokens": number of scored tokens}.
    """
    if not callable(logits_fn):
        raise TypeError(f"logits_fn must be callable, got {type(logits_fn)}")
    ids = _as_token_ids(token_ids)
    for field, v, lo in (("seq_len", seq_len, 2), ("batch_size", batch_size, 1)):
        if not isinstance(v, int) or isinstance(v, bool) or v < lo:
            raise ValueError(f"{field} must be an int >= {lo}, got {v!r}")
    if stride is None:
        stride = seq_len
    if not isinstance(stride, int) or isinstance(stride, bool) or not 1 <= stride <= seq_len:
        raise ValueError(f"stride must be an int in [1, seq_len={seq_len}] or None, got {stride!r}")
    if max_tokens is not None:
        if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 2:
            raise ValueError(f"max_tokens must be an int >= 2 or None, got {max_tokens!r}")
        ids = ids[:max_tokens]
    if ids.numel() < 2:
        raise ValueError(f"token_ids must hold at least 2 tokens, got {ids.numel()}")

    windows = _windows(ids.numel(), seq_len, stride)
    # Group equal-length windows into batches, preserving order.
    batches: list[list[tuple[int, int, int]]] = []
    for w in windows:
        if batches and len(batches[-1]) < batch_size and batches[-1][0][1] - batches[-1][0][0] == w[1] - w[0]:
            batches[-1].append(w)
        else:
            batches.append([w])

    total_nll = torch.zeros((), dtype=torch.float64)
    total = 0
    bar = tqdm(total=ids.numel() - 1, desc="perplexity", unit="tok", disable=not progress, leave=False)
    for batch in batches:
        T = batch[0][1] - batch[0][0]
        x = torch.stack([ids[b:e] for b, e, _ in batch])  # [B, T]
        logits = logits_fn(x)
        if (
            not isinstance(logits, torch.Tensor)
            or logits.dim() != 3
            or tuple(logits.shape[:2]) != tuple(x.shape)
        ):
            shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits)
            raise ValueError(f"logits_fn must return logits [B={x.shape[0]}, T={T}, V], got {shape}")
        V = logits.shape[-1]
        if int(x.max()) >= V:
            raise ValueError(f"token id {int(x.max())} >= vocabulary size V={V} of the logits")
        # nll[b, t] = -log p(x[b, t+1] | x[b, :t+1]), computed in fp32, summed in fp64.
        nll = F.cross_entropy(
            logits[:, :-1].float().reshape(-1, V), x[:, 1:].reshape(-1).to(logits.device), reduction="none"
        ).view(len(batch), T - 1)
        for i, (b, _, first) in enumerate(batch):
            part = nll[i, first - b - 1 :]
            total_nll += part.double().sum().cpu()
            total += part.numel()
            bar.update(part.numel())
    bar.close()
    mean = float(total_nll / total)
    return {"ppl": math.exp(mean), "nll": mean, "tokens": total}


def hf_logits_fn(model, device: str | torch.device | None = None) -> LogitsFn:
    """Logits function of a Hugging Face causal LM: `tokens [B, T] -> model(tokens).logits`."""
    dev = torch.device(device) if device is not None else next(model.parameters()).device

    def fn(tokens: torch.Tensor) -> torch.Tensor:
        return model(input_ids=tokens.to(dev), use_cache=False).logits

    return fn


def check_vocab(tokens: torch.Tensor, model, what: str) -> None:
    """A clear error when ``tokens`` hold ids the model has no embedding for."""
    V = model.config.vocab_size
    if int(tokens.max()) >= V:
        raise ValueError(
            f"{what} holds token id {int(tokens.max())} >= the model's vocab_size={V} "
            "(wrong tokenizer for this model?)"
        )


@torch.no_grad()
def model_perplexity(model, tokens: torch.Tensor, *, seq_len: int, batch_size: int = 8, max_tokens: int | None = None,
                     stride: int | None = None, device: str | torch.device = "auto", dtype: str = "auto",
                     progress: bool = False) -> dict:
    """Perplexity of a kvslim ``Transformer`` on a token stream (see :func:`perplexity`).

    ``dtype`` is the autocast dtype (``auto``: bf16 on CUDA, fp32 on CPU). Returns
    ``{"ppl", "nll", "tokens"}``.
    """
    dev = resolve_device(device)
    check_vocab(tokens if max_tokens is None else tokens[:max_tokens], model, "evaluation text")
    was_training = model.training
    model.eval()

    def logits_fn(x):
        with autocast(dev, dtype):
            return model(x.to(dev)).float()

    try:
        return perplexity(logits_fn, tokens, seq_len=seq_len, batch_size=batch_size, stride=stride,
                          max_tokens=max_tokens, progress=progress)
    finally:
        model.train(was_training)


def eval_ppl(*, model, texts, tokenizer=None, seq_len: int = 512, batch_size: int = 4, max_tokens: int | None = None,
             stride: int | None = None, device: str = "auto", dtype: str = "auto", progress: bool = True,
             clean: bool = False) -> list[dict]:
    """Perplexity of a model (``Transformer`` or kvslim / Hugging Face directory) on several sources.

    A bare corpus name means its held-out part (``moby-dick`` = ``moby-dick:eval``). A text file is
    scored exactly as stored (every character, no stripping) unless ``clean``.
    Returns one ``{"text", "ppl", "nll", "tokens", "source_tokens", "windows"}`` per source
    (``kvslim eval ppl``): ``tokens`` were scored out of ``source_tokens``; the first token of each
    window is context only.
    """
    from kvslim.eval.tokenizer import has_tokenizer, resolve_tokenizer
    from kvslim.eval.tokens import load_tokens
    from kvslim.model import Transformer, load_model

    if isinstance(texts, (str, os.PathLike, torch.Tensor)):
        texts = [texts]
    if dtype not in AUTOCAST_DTYPES:
        raise ValueError(f"dtype must be one of {AUTOCAST_DTYPES}, got {dtype!r}")
    dev = resolve_device(device)
    m = load_model(model, what="model", device=dev)
    if tokenizer is None and not isinstance(model, Transformer) and has_tokenizer(model):
        tokenizer = os.fspath(model)
    tok = resolve_tokenizer(tokenizer) if tokenizer is not None else None
    rows = []
    for t in texts:
        ids = load_tokens(t, tokenizer=tok, default_split="eval", clean=clean)
        used = ids if max_tokens is None else ids[:max_tokens]
        r = model_perplexity(m, ids, seq_len=seq_len, batch_size=batch_size, max_tokens=max_tokens, stride=stride,
                             device=dev, dtype=dtype, progress=progress)
        windows = len(_windows(used.numel(), seq_len, stride or seq_len))
        rows.append({"text": t if isinstance(t, str) else "tokens", **r, "source_tokens": int(ids.numel()),
                     "windows": windows})
    return rows
