"""Token streams for training and evaluation: text sources and token files.

A *source* is one of

* a named corpus of `kvslim.eval.data` with an optional split: ``sotu``, ``sotu:calib``,
  ``sotu-train``, ``sotu-eval``, ``moby-dick``, ``shakespeare:eval``, ... (``-train`` is an
  alias of ``:calib``, the part of a corpus that is not held out);
* a UTF-8 text file (``.txt`` or any other suffix), tokenized with the given tokenizer;
* a file of token ids: ``.npy`` (a 1-D integer array) or ``.bin`` (raw little-endian
  ``uint16`` ids, nanoGPT's format; ``bin_dtype`` picks another width).

Tokenizers are resolved by :mod:`kvslim.eval.tokenizer`.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from kvslim.eval.data import CORPORA, load_text
from kvslim.eval.tokenizer import resolve_tokenizer, tokenize

__all__ = ["TOKEN_SUFFIXES", "load_tokens", "parse_source", "save_tokens", "source_text"]

TOKEN_SUFFIXES = (".npy", ".bin")
BIN_DTYPES = {"uint16": np.uint16, "int32": np.int32, "uint32": np.uint32, "int64": np.int64}
SPLIT_ALIASES = {"train": "calib", "calib": "calib", "eval": "eval", "val": "eval", "test": "eval"}


def parse_source(
    source: str | os.PathLike, default_split: str | None = None
) -> tuple[str, str | None] | None:
    """``(corpus, split)`` if `source` names a corpus (``sotu``, ``sotu:eval``, ``sotu-eval``), else None.

    An existing file of that name wins over a corpus name. ``default_split`` applies when
    the name carries no split.
    """
    s = os.fspath(source)
    if os.path.exists(s):
        return None
    name, sep, split = s.partition(":")
    if not sep:
        for alias in SPLIT_ALIASES:
            if s.endswith(f"-{alias}") and s[: -len(alias) - 1] in CORPORA:
                name, split = s[: -len(alias) - 1], alias
                break
    if name not in CORPORA:
        return None
    if split:
        if split not in SPLIT_ALIASES:
            raise ValueError(f"split of {s!r} must be one of {sorted(SPLIT_ALIASES)}, got {split!r}")
        return name, SPLIT_ALIASES[split]
    return name, default_split


def source_text(source: str | os.PathLike, *, default_split: str | None = None, clean: bool = False) -> str:
    """Text of a corpus name (with split) or of a text file (exactly as stored unless ``clean``);
    ValueError naming the source otherwise."""
    named = parse_source(source, default_split)
    if named is not None:
        return load_text(named[0], split=named[1])
    p = Path(source)
    if not p.is_file():
        raise ValueError(
            f"text source {os.fspath(source)!r} is neither an existing file nor a corpus name "
            f"({', '.join(sorted(CORPORA))}, optionally with :calib/:eval or -train/-eval)"
        )
    if p.suffix in TOKEN_SUFFIXES:
        raise ValueError(f"{p} holds token ids, not text")
    return load_text(p, clean=clean)


def load_tokens(
    source: str | os.PathLike | torch.Tensor | np.ndarray,
    *,
    tokenizer=None,
    default_split: str | None = None,
    bin_dtype: str = "uint16",
    clean: bool = False,
) -> torch.Tensor:
    """A 1-D int64 token stream from a corpus name, a text file, a ``.npy``/``.bin`` file or ids.

    Args:
        source: see the module docstring; a tensor / array of ids is validated and returned.
        tokenizer: needed for text sources (anything `resolve_tokenizer` accepts, but
            ``bpe-N`` must already be resolved, since it needs the training text).
        default_split: split used for a corpus name without one (``"calib"`` or ``"eval"``).
        bin_dtype: element type of ``.bin`` files.
    """
    if isinstance(source, (torch.Tensor, np.ndarray)):
        return _check_ids(torch.as_tensor(source), "token ids")
    s = os.fspath(source)
    p = Path(s)
    if p.suffix in TOKEN_SUFFIXES:
        if not p.is_file():
            raise ValueError(f"token file {s!r} does not exist")
        if p.suffix == ".npy":
            arr = np.load(p, allow_pickle=False)
        else:
            if bin_dtype not in BIN_DTYPES:
                raise ValueError(f"bin_dtype must be one of {sorted(BIN_DTYPES)}, got {bin_dtype!r}")
            arr = np.fromfile(p, dtype=BIN_DTYPES[bin_dtype])
        arr = np.asarray(arr)
        if not np.issubdtype(arr.dtype, np.integer):
            raise ValueError(f"{s}: token ids must be integers, got dtype {arr.dtype}")
        return _check_ids(torch.from_numpy(arr.astype(np.int64)), s)
    text = source_text(s, default_split=default_split, clean=clean)
    if tokenizer is None:
        raise ValueError(f"text source {s!r} needs a tokenizer")
    return tokenize(text, resolve_tokenizer(tokenizer))


def _check_ids(t: torch.Tensor, what: str) -> torch.Tensor:
    if t.dtype.is_floating_point or t.dtype == torch.bool:
        raise ValueError(f"{what}: token ids must be integers, got {t.dtype}")
    if t.dim() != 1:
        raise ValueError(f"{what}: token ids must be 1-D, got shape {tuple(t.shape)}")
    if t.numel() < 2:
        raise ValueError(f"{what}: need at least 2 tokens, got {t.numel()}")
    if int(t.min()) < 0:
        raise ValueError(f"{what}: token ids must be >= 0, got min {int(t.min())}")
    return t.to(torch.int64)


def save_tokens(ids: torch.Tensor, path: str | os.PathLike) -> Path:
    """Save a 1-D token stream as ``.npy`` (uint16 when every id fits, else int32)."""
    ids = _check_ids(torch.as_tensor(ids), "token ids")
    p = Path(path)
    if p.suffix != ".npy":
        raise ValueError(f"save_tokens writes .npy files, got {p}")
    dtype = np.uint16 if int(ids.max()) < 2**16 else np.int32
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(f".{p.name}.tmp.npy")
    np.save(tmp, ids.numpy().astype(dtype))
    os.replace(tmp, p)
    return p
