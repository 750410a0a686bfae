"""Text mixtures: the ``--calib`` spec grammar, shared by calibration and training data.

A spec names one source or a weighted mixture of genres (``sotu:0.25,moby-dick:0.25,...``; the
preset ``mix`` is the converters' default calibration). Converters take *windows* from it
(``kvslim.convert.calib.calibration_tokens``: each source its share of the windows); recovery
training (``kvslim finetune --text mix``) takes one token *stream* (:func:`mixture_tokens`:
each source its share of the tokens), so the student is trained on the distribution it was
calibrated on. Only calib splits are read: the eval splits stay held out.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch

__all__ = ["CALIB_GRAMMAR", "CALIB_PRESETS", "DEFAULT_CALIB", "CalibSource", "is_mixture", "mixture_text",
           "mixture_tokens", "parse_calib_spec", "window_counts"]


CALIB_GRAMMAR = """\
SPEC   := "mix" (= sotu:0.25,moby-dick:0.25,shakespeare:0.25,code:0.25) | ITEM ("," ITEM)*
ITEM   := SOURCE [":" WEIGHT]
SOURCE := a corpus of kvslim.eval.data (sotu, moby-dick, shakespeare) or a local genre of
          kvslim.eval.local (code, pyref, legal, docs): its *calib* split is used (":calib" may
          be written out; ":eval" is refused), or the path of a UTF-8 text file (used whole)
WEIGHT := a positive number; weights are normalised to sum 1; an omitted weight is 1"""


#: named ``--calib`` specs. ``mix``, the CLI default: four genres in equal shares, chosen because a
#: conversion calibrated on one genre degrades 2-3x more on genres it never saw
#: (benchmarks/results/convert_matrix.md: MLA r=128 held-out gmean x8.05 from ``sotu`` alone, x3.40 from ``mix``).
CALIB_PRESETS = {"mix": "sotu:0.25,moby-dick:0.25,shakespeare:0.25,code:0.25"}
DEFAULT_CALIB = "mix"


@dataclass(frozen=True)
class CalibSource:
    """One item of a ``--calib`` spec: where its text comes from and its share of the windows."""

    source: str  # corpus / genre name, or a file path
    weight: float
    is_file: bool

    def text(self) -> str:
        """Its text: a file whole, a corpus or genre its calib split (never the held-out eval split)."""
        from kvslim.eval.data import load_text

        return load_text(self.source) if self.is_file else load_text(self.source, "calib")


def parse_calib_spec(spec: str) -> list[CalibSource]:
    """Parse a ``--calib`` spec (grammar: ``CALIB_GRAMMAR``) and check every source exists.

    Raises ValueError naming the bad item: empty items, bad or non-positive weights, an
    ``:eval`` split, a duplicated source, or a source that is neither a known corpus/genre nor
    an existing file. Nothing is read or tokenized here beyond checking that files exist.
    """
    from kvslim.eval.data import CORPORA
    from kvslim.eval.local import LOCAL_GENRES

    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"calib spec must be a non-empty string, got {spec!r}")
    spec = CALIB_PRESETS.get(spec.strip(), spec)
    names = sorted(CORPORA) + list(LOCAL_GENRES)
    out: list[CalibSource] = []
    for raw in spec.split(","):
        item = raw.strip()
        if not item:
            raise ValueError(f"calib spec {spec!r} has an empty item (check the commas)")
        src, weight = item, 1.0
        head, sep, tail = item.rpartition(":")
        if sep and not os.path.exists(item):
            try:
                weight = float(tail)
            except ValueError:
                weight = None
            if weight is not None:
                src = head
            else:
                weight = 1.0
        if not math.isfinite(weight) or weight <= 0:
            raise ValueError(f"calib item {item!r}: weight must be a positive number, got {tail!r}")
        name, sep2, split = src.partition(":")
        if os.path.isfile(src):
            out.append(CalibSource(src, weight, True))
        elif name in names and (not sep2 or split == "calib"):
            out.append(CalibSource(name, weight, False))
        elif name in names:
            raise ValueError(f"calib item {item!r}: calibration reads only the calib split of {name!r}, "
                             f"not {split!r} (the eval split is held out)")
        else:
            raise ValueError(f"calib item {item!r}: unknown source {src!r}: not a corpus or genre {names} "
                             "and not an existing file")
    seen = [c.source for c in out]
    dup = sorted({x for x in seen if seen.count(x) > 1})
    if dup:
        raise ValueError(f"calib spec {spec!r} names {dup} more than once")
    return out


def window_counts(sources: Sequence[CalibSource], num_samples: int) -> list[int]:
    """Windows per source: ``num_samples`` split by weight (largest remainder), each at least 1."""
    total = sum(c.weight for c in sources)
    exact = [num_samples * c.weight / total for c in sources]
    counts = [int(math.floor(x)) for x in exact]
    for i in sorted(range(len(exact)), key=lambda i: (counts[i] - exact[i], i))[: num_samples - sum(counts)]:
        counts[i] += 1
    for c, n in zip(sources, counts):
        if n < 1:
            raise ValueError(f"calib item {c.source!r} gets 0 of {num_samples} windows at weight "
                             f"{c.weight / total:.3f}; raise --calib-samples or its weight")
    return counts


def is_mixture(spec) -> bool:
    """Whether a training ``--text`` is a mixture spec (a preset or several comma-separated items)
    rather than one source (a corpus, a file or a token file, read by ``kvslim.eval.tokens``)."""
    return isinstance(spec, str) and (spec.strip() in CALIB_PRESETS or "," in spec) and not os.path.exists(spec)


def mixture_text(spec: str) -> str:
    """The calib text of every source of ``spec``, in spec order (e.g. to train a BPE tokenizer on)."""
    return "\n\n".join(c.text() for c in parse_calib_spec(spec))


def mixture_tokens(spec: str, tokenizer) -> torch.Tensor:
    """One 1-D token stream in which every source of ``spec`` holds its weight's share of the tokens.

    Each source's calib split is tokenized; the stream is as long as the scarcest source allows
    (``min(len_i / share_i)``), each source contributing its first ``share_i`` of that length, and the
    sources follow each other in spec order (training samples windows uniformly from the stream).
    """
    from kvslim.eval.tokenizer import tokenize

    sources = parse_calib_spec(spec)
    ids = [tokenize(c.text(), tokenizer) for c in sources]
    total = sum(c.weight for c in sources)
    shares = [c.weight / total for c in sources]
    length = min(len(x) / s for x, s in zip(ids, shares))
    parts = [x[: int(length * s)] for x, s in zip(ids, shares)]
    for c, x in zip(sources, parts):
        if len(x) == 0:
            raise ValueError(f"text mixture {spec!r}: source {c.source!r} contributes no tokens")
    return torch.cat(parts).long()
