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
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

__all__ = ["hf_logits_fn", "load_tokenizer", "perplexity", "tokenize"]

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


def load_tokenizer(path: str | os.PathLike):
    """`AutoTokenizer.from_pretrained(path)` with the hub switched off (local directories only)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoTokenizer

    if not Path(path).is_dir():
        raise ValueError(
            f"tokenizer path must be a local directory with tokenizer files, got {os.fspath(path)!r}"
        )
    return AutoTokenizer.from_pretrained(os.fspath(path))


def tokenize(text: str, tokenizer) -> torch.Tensor:
    """Token ids of `text` as a 1-D LongTensor, without BOS/EOS or other special tokens.

    Args:
        text: non-empty string.
        tokenizer: a directory with tokenizer files (e.g. `smollm2_dir()`), a transformers
            tokenizer, or a `tokenizers.Tokenizer`.
    """
    if not isinstance(text, str) or not text:
        raise ValueError(
            f"text must be a non-empty str, got {type(text).__name__} of length {len(text) if isinstance(text, str) else '-'}"
        )
    if isinstance(tokenizer, (str, os.PathLike)):
        tokenizer = load_tokenizer(tokenizer)
    backend = getattr(tokenizer, "backend_tokenizer", tokenizer)  # fast path, no length warnings
    if hasattr(backend, "encode") and hasattr(backend, "get_vocab_size"):
        ids = backend.encode(text, add_special_tokens=False).ids
    elif callable(tokenizer):
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    else:
        raise TypeError(
            f"tokenizer must be a path, a transformers tokenizer or a tokenizers.Tokenizer, got {type(tokenizer)}"
        )
    return torch.tensor(ids, dtype=torch.long)
