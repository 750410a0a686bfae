"""One call from a checkpoint directory to a converted one: load, calibrate, convert, write.

``convert_checkpoint`` is what ``kvslim convert`` runs. It validates everything it can
(paths, target shapes, ranks, formats) *before* the slow calibration pass, and writes the
output atomically (export.py).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from kvslim.checkpoint import check_output, read_config
from kvslim.convert.calib import (
    attention_input_moments,
    calibration_tokens,
    check_calibration_batches,
    check_shrinkage,
    parse_calib_spec,
    shrink_moment,
)
from kvslim.convert.deepseek import check_qk_norm
from kvslim.convert.export import DTYPES, write_checkpoint
from kvslim.convert.gqa_to_gta import check_gta_target, fit_gta
from kvslim.convert.latent import check_latent_target, fit_latent, layer_spectra, max_latent_dim
from kvslim.convert.mha_to_gqa import check_gqa_target, mha_to_gqa
from kvslim.convert.ranks import RANK_ALLOCS, allocate_ranks, check_rank_alloc, resolve_rank_min
from kvslim.convert.refit import REFIT_LR, check_refit, refit_attention
from kvslim.convert.select import AUTO, freqfold_candidates, select_freqfold, selection, selection_tokens
from kvslim.convert.sequential import ModelLayers, check_calib_pass, convert_layerwise
from kvslim.convert.stream import CALIB_BATCH, stream_convert, stream_layers, stream_select_nll
from kvslim.convert.tensorio import LazyCheckpoint
from kvslim.model import Transformer
from kvslim.serving import SERVE_TARGETS, mla_layout
from kvslim.spec import AttentionSpec

__all__ = ["ConvertResult", "check_conversion", "convert_checkpoint", "convert_model", "export_summary", "kv_table"]

TARGETS = ("gqa", "mla", "gla", "gta")
DEFAULT_FORMAT = {"gqa": "kvslim", "mla": "deepseek", "gla": "kvslim", "gta": "kvslim"}


@dataclass
class ConvertResult:
    source: AttentionSpec
    target: AttentionSpec
    num_layers: int
    out: Path | None = None
    seconds: float = 0.0
    stats: dict = field(default_factory=dict)
    export: dict = field(default_factory=dict)  # the DeepSeek writer's report (layout, cost, fp16 check)
    layer_ranks: list[int] | None = None  # per-layer latent dims (``target.latent_dim`` is the largest)


def kv_table(source: AttentionSpec, target: AttentionSpec, num_layers: int, dtype_bytes: int = 2,
             layer_ranks: list[int] | None = None) -> str:
    """Before/after KV cache size as a small text table (``layer_ranks``: the target's per-layer latent dims;
    its elements/token/layer is then the mean, and bytes/token the sum over layers)."""
    rows = [("", "kind", "elements/token/layer", f"bytes/token ({num_layers} layers, {dtype_bytes} B)", "ratio")]
    for label, s in (("before", source), ("after", target)):
        ranks = layer_ranks if label == "after" and layer_ranks else None
        total = sum(s.replace(latent_dim=r).row_dim for r in ranks) if ranks else s.row_dim * num_layers
        per = f"{total / num_layers:g} (mean; latent dims {min(ranks)}..{max(ranks)})" if ranks else str(s.row_dim)
        rows.append((label, s.name, per, str(total * dtype_bytes), f"{total / (source.row_dim * num_layers):.3f}"))
    w = [max(len(r[i]) for r in rows) for i in range(5)]
    return "\n".join("  ".join(c.ljust(w[i]) for i, c in enumerate(r)) for r in rows)


def export_summary(report: dict, num_layers: int, dtype_bytes: int = 2) -> str:
    """What a DeepSeek export (``ConvertResult.export``) costs and guarantees, as printed lines."""
    lo, hi = report["norm_weight_log2"]
    fp16 = (f"weights representable in fp16 (max relative cast error {report['fp16_cast_error']:.1e}); "
            if report["fp16_ok"] else f"weights NOT representable in fp16 (cast error "
            f"{report['fp16_cast_error']:.1e}, norm weight up to 2^{hi}); ")
    return "\n".join([
        report["layout"].describe(num_layers, dtype_bytes),
        f"rms_norm_eps {report['rms_norm_eps']:g} declared for every norm (source {report['source_rms_norm_eps']:.3g}; "
        f"residual stream x{report['residual_scale']:.4g} so each norm computes as before)",
        f"kv_a_layernorm exactly linear: weight 2^{lo}..2^{hi}, deviation <= {report['latent_norm_nonlinearity']:.1e} "
        "(relative) for any input",
        fp16 + "serve in bfloat16 or float32 (fp16 compute cannot run the linear latent norm)",
    ])


def check_conversion(spec: AttentionSpec, to: str, *, kv_heads=None, latent_heads=None, kv_lora_rank=None,
                     rope_dim: int = 64, freqfold=None, method: str = "transmla", gta_state: str = "joint",
                     fit: str = "bkv", rank_alloc: str = "uniform", rank_min: int | None = None,
                     calib_pass: str = "original", calib_shrinkage: float = 0.0,
                     calib_shrink_to: str = "identity", rope_repeat: int = 1, refit_steps: int = 0,
                     refit_lr: float = REFIT_LR, refit_device: str | None = None) -> None:
    """Raise ValueError naming the bad option if ``spec`` cannot be converted ``to`` this target.

    The one validation of a conversion: :func:`convert_checkpoint` runs it before the slow
    calibration pass, :func:`convert_model` before converting; neither runs it twice.
    """
    if to not in TARGETS:
        raise ValueError(f"target must be one of {TARGETS}, got {to!r}")
    if freqfold == AUTO:
        if to == "gqa" or method != "transmla":
            raise ValueError(f"freqfold='auto' picks RoRoPE's FreqFold group for mla, gla and gta (method transmla), "
                             f"not --to {to} with method {method!r}")
        freqfold = None
    check_calib_pass(calib_pass, to)
    check_refit(refit_steps, refit_lr, to, refit_device)
    check_shrinkage(calib_shrinkage, calib_shrink_to)
    if calib_shrinkage and to == "gqa":
        raise ValueError("calib_shrinkage applies to mla, gla and gta (the targets that calibrate); --to gqa "
                         "mean-pools without calibration")
    if rank_alloc not in RANK_ALLOCS:
        raise ValueError(f"rank_alloc must be one of {RANK_ALLOCS}, got {rank_alloc!r}")
    if to in ("gqa", "gta"):
        check_rank_alloc(rank_alloc, to=to, latent_dim=kv_lora_rank, rank_min=rank_min, cap=0)
        if rope_repeat != 1:
            raise ValueError(f"rope_repeat applies to mla and gla (their decoupled RoPE key), not --to {to}")
    if spec.kind not in ("mha", "mqa", "gqa"):
        raise ValueError(f"unsupported source attention kind {spec.kind!r}: converters read MHA/MQA/GQA checkpoints")
    if to == "gqa":
        if fit != "bkv":
            raise ValueError(f"--fit {fit} applies to mla, gla and gta; --to gqa mean-pools")
        check_gqa_target(spec, kv_heads)
    elif to == "gta":
        check_gta_target(spec, freqfold=freqfold, state=gta_state, fit=fit)
    else:
        if kv_lora_rank is None:
            raise ValueError(f"--to {to} needs --kv-lora-rank (latent dim per latent head)")
        h_c = 1 if to == "mla" else latent_heads
        if h_c is None:
            raise ValueError("--to gla needs --latent-heads")
        check_latent_target(spec, h_c, kv_lora_rank, rope_dim, method, freqfold, fit, rope_repeat)
        check_rank_alloc(rank_alloc, to=to, latent_dim=kv_lora_rank, rank_min=rank_min,
                         cap=max_latent_dim(spec, h_c, rope_dim))


def _run(model: Transformer, to: str, moments, *, kv_heads, latent_heads, kv_lora_rank, rope_dim, freqfold, method,
         gta_state, fit, rank_alloc, rank_min, progress, calib_shrinkage=0.0,
         calib_shrink_to="identity", rope_repeat=1) -> tuple[Transformer, dict]:
    """Convert a model whose target :func:`check_conversion` accepted (``moments`` before shrinkage)."""
    stats: dict = {}
    if to == "gqa":
        return mha_to_gqa(model, num_kv_heads=kv_heads), stats
    if calib_shrinkage:
        moments = [shrink_moment(m, calib_shrinkage, calib_shrink_to) for m in moments]
    if to == "gta":
        return fit_gta(model, moments, state=gta_state, freqfold=freqfold, fit=fit, progress=progress,
                       stats=stats), stats
    h_c = 1 if to == "mla" else latent_heads
    out = fit_latent(model, moments, latent_heads=h_c, latent_dim=kv_lora_rank, rope_dim=rope_dim,
                     freqfold=freqfold, method=method, fit=fit, rank_alloc=rank_alloc, rank_min=rank_min,
                     progress=progress, stats=stats, rope_repeat=rope_repeat)
    return out, stats


def convert_model(model: Transformer, to: str, *, calib: torch.Tensor | None = None, moments=None,
                  kv_heads: int | None = None, latent_heads: int | None = None, kv_lora_rank: int | None = None,
                  rope_dim: int = 64, freqfold: int | None = None, method: str = "transmla",
                  gta_state: str = "joint", fit: str = "bkv", rank_alloc: str = "uniform", rank_min: int | None = None,
                  calib_pass: str = "original", calib_shrinkage: float = 0.0, calib_shrink_to: str = "identity",
                  rope_repeat: int = 1, select_calib: torch.Tensor | None = None, refit_steps: int = 0,
                  refit_lr: float = REFIT_LR, refit_device: str | None = None,
                  progress: bool = True) -> tuple[Transformer, dict]:
    """Convert an in-memory kvslim Transformer; returns (new model, diagnostics).

    ``moments`` (per-layer ``E[x̃x̃ᵀ]`` from ``attention_input_moments``) or ``calib`` token
    windows are needed for every target but ``gqa``. ``rank_alloc="energy"`` (mla/gla) gives each
    layer its own latent dim, ``kv_lora_rank`` on average (ranks.py); diagnostics then hold
    ``layer_ranks`` and ``rank_alloc`` (the fit objective of the ranks and of uniform ranks).
    ``calib_pass="sequential"`` (sequential.py) calibrates layer i on the activations of the converted
    layers ``0..i-1``; it needs ``calib`` (its moments exist only while converting), not ``moments``.
    ``calib_shrinkage`` λ shrinks each layer's input covariance toward a scaled identity (``calib_shrink_to=
    "diagonal"``: toward its diagonal) before fitting (calib.py ``shrink_moment``; 0 = none).
    ``freqfold="auto"`` converts once per FreqFold candidate and keeps the one with the lowest NLL on
    ``select_calib`` (calibration-split windows other than the fitting ones; select.py); diagnostics then hold
    ``freqfold_select``. ``refit_steps > 0`` then refits every converted attention layer to the source layer's
    output on ``calib`` (refit.py; needs ``calib``); diagnostics hold ``refit_error`` (per layer, the relative
    output error before and after). With ``auto``, FreqFold is chosen on the closed-form fits, then refit once.
    ``refit_device``: where the refit runs (refit.py ``refit_device``: None = the CPU, ``"auto"``, ``"cuda"``).
    """
    opts = dict(kv_heads=kv_heads, latent_heads=latent_heads, kv_lora_rank=kv_lora_rank, rope_dim=rope_dim,
                freqfold=freqfold, method=method, gta_state=gta_state, fit=fit, rank_alloc=rank_alloc,
                rank_min=rank_min, calib_shrinkage=calib_shrinkage, calib_shrink_to=calib_shrink_to,
                rope_repeat=rope_repeat)
    check_conversion(model.spec, to, calib_pass=calib_pass, refit_steps=refit_steps, refit_lr=refit_lr,
                     refit_device=refit_device, **opts)
    refit = refitter(refit_steps, refit_lr, refit_device)
    if freqfold == AUTO:
        return _convert_auto(model, to, calib, moments, calib_pass, opts, select_calib, progress, refit)
    return _convert_checked(model, to, calib, moments, calib_pass, opts, progress, refit)


def refitter(steps: int, lr: float, device: str | None = None):
    """The per-layer refit the layer walk applies (stream.py ``_walk``), or None for ``steps == 0``."""
    if not steps:
        return None
    return lambda source, converted, inputs: refit_attention(source, converted, inputs, steps=steps, lr=lr,
                                                             device=device)


def _convert_checked(model: Transformer, to: str, calib, moments, calib_pass: str, opts: dict,
                     progress: bool, refit=None) -> tuple[Transformer, dict]:
    """:func:`convert_model` once :func:`check_conversion` accepted ``opts`` (a FreqFold group, not ``auto``)."""
    if calib_pass == "sequential" or refit is not None:
        if calib_pass == "sequential" and moments is not None:
            raise ValueError("moments: calib_pass='sequential' takes layer i's moment on the converted layers "
                             "0..i-1, so it cannot use precomputed moments; pass calib (token windows) instead")
        if calib is None:
            raise ValueError(f"--to {to} needs calibration tokens" + (
                "" if refit is None else " (refit_steps: the refit reads the calibration windows, not only moments)"))
        check_calibration_batches(calib, model.config.vocab_size)
        return _run_walk(model, to, calib, opts, progress, calib_pass == "sequential", refit)
    if to != "gqa" and moments is None:
        if calib is None:
            raise ValueError(f"--to {to} needs calibration tokens")
        moments = attention_input_moments(model, calib, batch_size=CALIB_BATCH, progress=progress)
    if moments is not None and len(moments) != model.config.num_layers:
        raise ValueError(f"moments: need one E[x x^T] per layer ({model.config.num_layers}), got {len(moments)}")
    return _run(model, to, moments, progress=progress, **opts)


def _convert_auto(model: Transformer, to: str, calib, moments, calib_pass: str, opts: dict, select_calib,
                  progress: bool, refit=None) -> tuple[Transformer, dict]:
    """``freqfold="auto"`` in memory: :func:`_convert_checked` per candidate (one calibration pass shared by all,
    except the sequential pass's), the lowest NLL on ``select_calib`` kept (select.py); with ``refit``, the
    chosen candidate is converted again and refit (the candidates are scored as closed-form fits)."""
    if select_calib is None:
        raise ValueError("select_calib: freqfold='auto' scores each candidate on calibration windows other than "
                         "the fitting ones; pass them as select_calib")
    check_calibration_batches(select_calib, model.config.vocab_size)
    windows = calib
    if calib_pass != "sequential" and moments is None and calib is not None:
        moments, calib = attention_input_moments(model, calib, batch_size=CALIB_BATCH, progress=progress), None
    out, stats, sel = select_freqfold(
        lambda f: _convert_checked(model, to, calib, moments, calib_pass, dict(opts, freqfold=f), False),
        _freqfold_candidates(model.spec, to, opts["rope_dim"], opts["rope_repeat"]), select_calib, progress)
    if refit is not None:
        del out
        out, stats = _convert_checked(model, to, windows, None, calib_pass, dict(opts, freqfold=sel["chosen"]),
                                      progress, refit)
    stats["freqfold_select"] = sel
    return out, stats


def freqfold_auto_streams(calib_pass: str, rank_alloc: str) -> bool:
    """Whether a streaming conversion can choose ``freqfold="auto"`` (it scores candidates on the original
    calibration pass with uniform ranks)."""
    return calib_pass == "original" and rank_alloc == "uniform"


def _freqfold_candidates(spec: AttentionSpec, to: str, rope_dim: int, rope_repeat: int) -> list[int]:
    """The FreqFold groups ``freqfold="auto"`` tries (GTA's RoPE key is d_h/2 wide)."""
    if to == "gta":
        return freqfold_candidates(spec.rope_dim, spec.head_dim // 2)
    return freqfold_candidates(spec.rope_dim, rope_dim, rope_repeat)


def _layer_converter(to: str, opts: dict, ranks: list):
    """``fn(i, one-layer model of source layer i, [moment]) -> (converted one-layer model, stats)`` with layer
    i's latent dim ``ranks[i]``: the converter streaming and the sequential pass apply layer by layer."""
    one = dict(opts, rank_alloc="uniform", rank_min=None)

    def convert_layer(i, shell, moments):
        return _run(shell, to, moments, progress=False, **dict(one, kv_lora_rank=ranks[i]))

    return convert_layer


def _run_walk(model: Transformer, to: str, calib: torch.Tensor, opts: dict, progress: bool, sequential: bool,
              refit=None) -> tuple[Transformer, dict]:
    """The in-memory conversion layer by layer (sequential.py ``convert_layerwise``) with the converter
    streaming applies per layer: the sequential pass, and any conversion with a refit (refit.py)."""
    ranks, alloc = [opts["kv_lora_rank"]] * model.config.num_layers, None
    if opts["rank_alloc"] != "uniform":  # allocated on the original pass, as streaming does
        ranks, alloc = _stream_ranks(ModelLayers(model), calib, to, opts, progress)
    out, stats = convert_layerwise(model, calib, _layer_converter(to, opts, ranks), progress=progress,
                                    sequential=sequential, refit=refit)
    if alloc is not None:
        stats["rank_alloc"] = alloc
    return out, stats


def _target_spec(spec: AttentionSpec, to: str, *, latent_heads, kv_lora_rank, rope_dim, rope_repeat=1) -> AttentionSpec:
    """The converted model's attention, known before calibrating (so the export can be checked first)."""
    base = dict(hidden_size=spec.hidden_size, num_heads=spec.num_heads, head_dim=spec.head_dim,
                rope_theta=spec.rope_theta, rope_scaling=spec.rope_scaling, qkv_bias=spec.qkv_bias)
    if to == "gta":
        return AttentionSpec(kind="gta", num_kv_heads=spec.num_kv_heads, **base)
    return AttentionSpec(kind=to, num_latent_heads=1 if to == "mla" else latent_heads, latent_dim=kv_lora_rank,
                         rope_dim=rope_dim, rope_repeat=rope_repeat, v_head_dim=spec.head_dim, latent_norm=False,
                         **base)


def _check_deepseek_source(bias, num_layers: int) -> None:
    """Biases a DeepSeek-V3 export can never hold exactly, found in the source (before calibrating).

    ``bias(i, name)``: layer ``i``'s ``name`` bias (None if it has none), from a model or read lazily.
    """
    for i in range(num_layers):
        for name, why in (("q_proj", "a query bias adds b_q·k to the scores, which varies with the key"),
                          ("v_proj", "a value bias adds a constant o_proj(b_v) to the attention output")):
            b = bias(i, name)
            if b is not None and bool(b.abs().max() > 0):
                raise ValueError(f"layer {i} {name} has a bias; DeepSeek-V3 has no attention biases and {why}, "
                                 "so it is not exact without one; use --format kvslim")


def convert_checkpoint(*, model_dir: str | os.PathLike, out: str | os.PathLike, to: str, fmt: str | None = None,
                       target: str | None = None, head_size: int | None = None, force: bool = False, kv_heads: int | None = None, latent_heads: int | None = None,
                       kv_lora_rank: int | None = None, rope_dim: int = 64, freqfold: int | None = None,
                       method: str = "transmla", calib_samples: int = 32, calib_seq_len: int = 256,
                       calib_text: str = "sotu", calib_tokens: torch.Tensor | None = None, seed: int = 0,
                       dtype: str = "float32", gta_state: str = "joint", fit: str = "bkv",
                       rank_alloc: str = "uniform", rank_min: int | None = None, calib_pass: str = "original",
                       calib_shrinkage: float = 0.0, calib_shrink_to: str = "identity", rope_repeat: int = 1,
                       select_tokens: torch.Tensor | None = None, refit_steps: int = 0, refit_lr: float = REFIT_LR,
                       refit_device: str | None = None, progress: bool = True, stream: bool = True) -> ConvertResult:
    """Convert the checkpoint in ``model_dir`` and write it to ``out`` (atomically).

    Args:
        model_dir: Hugging Face Llama/Mistral/Qwen2 directory or a kvslim checkpoint.
        out: output directory; must not exist unless ``force``.
        to: ``gqa`` (mean-pool to ``kv_heads``), ``mla``, ``gla`` (``latent_heads``), ``gta``.
        fmt: ``deepseek`` (mla, gla, gta; default for mla with uniform ranks and whenever ``target`` is
            given), ``hf`` (Llama; gqa only), ``kvslim`` (the default otherwise, and the only format of
            per-layer ranks: DeepSeek-V3's config holds one ``kv_lora_rank``).
        target: ``transformers`` (default), ``vllm`` or ``sglang``: shapes the DeepSeek export for that
            server (kvslim/serving.py: vllm pads the latent to an accepted head size, widens RoPE to 64).
        head_size: ``kv_lora_rank + qk_rope_head_dim`` to pad the DeepSeek export to (e.g. 576).
        kv_lora_rank: latent dim per latent head (mla/gla).
        rope_dim: ``d_R`` of the shared RoPE key (mla/gla; gta uses d_h/2).
        freqfold, method: see ``gqa_to_latent`` (freqfold None = smallest valid, r/(d_R/rope_repeat)).
            ``"auto"``: the candidate whose conversion has the lowest NLL on ``SELECT_SAMPLES`` (select.py)
            other windows of the calibration text (seed + 1), or on ``select_tokens``; streaming scores every
            candidate in one extra walk over the layers (stream.py ``stream_select_nll``).
        rope_repeat: RoRoPE components per RoPE frequency (mla/gla; ``AttentionSpec.rope_repeat``): with
            ``rope_dim = 2r`` and 2, two KV heads' worth of RoPE. Format kvslim only.
        calib_samples, calib_seq_len, seed: calibration windows (real text, calib splits).
        calib_text: a ``--calib`` spec (calib.py ``CALIB_GRAMMAR``): one source or a weighted
            mixture, e.g. ``sotu:0.25,moby-dick:0.25,shakespeare:0.25,code:0.25``.
        calib_tokens: ``[N, T]`` token windows to use instead of ``calib_text`` (tests, custom data).
        dtype: output weight dtype: float32, bfloat16 or float16.
        fit: ``bkv`` (TransMLA's balanced PCA) or ``output`` (the output-aware metric, latent.py).
        rank_alloc: ``uniform`` (every layer ``kv_lora_rank``) or ``energy`` (mla/gla: per-layer ranks
            summing to ``num_layers · kv_lora_rank``, in steps of 16, at least ``rank_min`` (default 16),
            chosen by greedy marginal gain on each layer's fit objective from the calibration; ranks.py),
            or ``relative`` (the same on each layer's fraction of its own energy).
        calib_pass: ``original`` (every layer calibrated on the source model's activations) or
            ``sequential`` (layer i on those of the converted layers 0..i-1; sequential.py).
        calib_shrinkage: λ in [0, 1): each layer's calibration covariance shrunk toward a scaled identity
            before fitting (calib.py ``shrink_moment``; 0 = none, the default); ``calib_shrink_to="diagonal"``
            shrinks toward the covariance's diagonal instead.
        refit_steps, refit_lr: Adam steps (one batch of calibration windows each) per layer that refit the
            converted attention to the source layer's output on the calibration windows (refit.py; 0 = the
            closed-form fit only); with ``freqfold="auto"`` the group is chosen first, on the closed-form fits.
        refit_device: where the refit runs: None (the CPU, with the rest of the conversion), ``"auto"`` (CUDA
            when available) or a device name; one layer and its calibration inputs are copied there at a time.
        stream: convert layer by layer, holding one layer at a time (stream.py; the default: its
            output is byte-identical); False loads the whole source model first.
    """
    t0 = time.time()
    model_dir, out = Path(model_dir), Path(out)
    if freqfold == AUTO and stream and not freqfold_auto_streams(calib_pass, rank_alloc):
        raise ValueError("freqfold='auto' in a streaming conversion scores candidates on the original calibration "
                         "pass with uniform ranks; with calib_pass='sequential' or per-layer ranks use stream=False "
                         "(--in-memory), or pick --freqfold")
    if freqfold == AUTO and calib_tokens is not None and select_tokens is None:
        raise ValueError("select_tokens: with calib_tokens, freqfold='auto' needs its selection windows too")
    if to != "gqa" and calib_tokens is None:
        parse_calib_spec(calib_text)  # a bad --calib fails before anything is read or written
    read_config(model_dir)
    if not any(model_dir.glob("*.safetensors")):
        raise ValueError(f"model_dir {model_dir} has no .safetensors files")
    check_output(out, force=force, sources=(model_dir,))
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    if target is not None and target not in SERVE_TARGETS:
        raise ValueError(f"target must be one of {SERVE_TARGETS}, got {target!r}")
    if rank_alloc not in RANK_ALLOCS:
        raise ValueError(f"rank_alloc must be one of {RANK_ALLOCS}, got {rank_alloc!r}")
    per_layer = rank_alloc != "uniform"
    if per_layer and (fmt == "deepseek" or target is not None or head_size is not None):
        # Zero-padding every layer to max(r_l) would be exact, but its served cache, L·(max r_l + d_R),
        # is larger than the uniform conversion's L·(R + d_R) the allocation was budgeted against.
        raise ValueError(f"format 'deepseek' (and --target/--mla-head-size) cannot hold rank_alloc={rank_alloc!r}: "
                         "DeepSeek-V3's config has one kv_lora_rank for all layers, and padding every layer to the "
                         "largest rank would make the served cache larger than the uniform one; use --format kvslim "
                         "(kvslim's model, engine and planner serve per-layer ranks) or --rank-alloc uniform")
    fmt = fmt or ("deepseek" if target is not None or head_size is not None
                  else "kvslim" if per_layer or rope_repeat != 1 else DEFAULT_FORMAT.get(to, "kvslim"))
    if fmt == "deepseek" and to == "gqa":
        raise ValueError("format 'deepseek' holds MLA, GLA or GTA models (as DeepSeek MLA); --to gqa needs "
                         "--format hf or kvslim")
    if fmt != "deepseek" and (target is not None or head_size is not None):
        raise ValueError(f"--target/--mla-head-size apply to format 'deepseek' only, not {fmt!r}")
    if fmt == "hf" and to != "gqa":
        raise ValueError(f"format 'hf' (Llama) holds GQA models only; --to {to} needs --format kvslim")
    if fmt == "deepseek" and dtype == "float16":
        raise ValueError("format 'deepseek' with float16: the exactly linear latent norm needs latent activations "
                         "~1e-7, below fp16's normal range; use bfloat16 or float32")
    target = target or "transformers"
    if stream:
        src = LazyCheckpoint(model_dir)
        cfg, n_params = src.config, src.num_params
        bias = lambda i, name: src.get(f"model.layers.{i}.self_attn.{name}.bias")  # noqa: E731
    else:
        model = Transformer.from_pretrained(model_dir, dtype=torch.float32)
        cfg, n_params = model.config, sum(v.numel() for v in model.state_dict().values())
        bias = lambda i, name: getattr(model.model.layers[i].self_attn, name).bias  # noqa: E731
    spec = cfg.attention
    check_output(out, force=force, sources=(model_dir,), expected_bytes=n_params * DTYPES[dtype].itemsize)
    opts = dict(kv_heads=kv_heads, latent_heads=latent_heads, kv_lora_rank=kv_lora_rank, rope_dim=rope_dim,
                freqfold=freqfold, method=method, gta_state=gta_state, fit=fit, rank_alloc=rank_alloc,
                rank_min=rank_min, calib_shrinkage=calib_shrinkage, calib_shrink_to=calib_shrink_to,
                rope_repeat=rope_repeat)
    check_conversion(spec, to, calib_pass=calib_pass, refit_steps=refit_steps, refit_lr=refit_lr,
                     refit_device=refit_device, **opts)
    refit = refitter(refit_steps, refit_lr, refit_device)
    if fmt == "deepseek":
        check_qk_norm(spec)
        mla_layout(_target_spec(spec, to, latent_heads=latent_heads, kv_lora_rank=kv_lora_rank, rope_dim=rope_dim,
                                rope_repeat=rope_repeat), target, head_size)
        if cfg.mlp_bias:
            raise ValueError("DeepSeek-V3's MLP has no biases: a model with mlp_bias needs --format kvslim")
        _check_deepseek_source(bias, cfg.num_layers)
    calib = calib_tokens
    if to != "gqa" and calib is None:
        for name, v in (("calib_samples", calib_samples), ("calib_seq_len", calib_seq_len)):
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        calib = calibration_tokens(model_dir, num_samples=calib_samples, seq_len=calib_seq_len,
                                   text=calib_text, seed=seed)
        if freqfold == AUTO:
            select_tokens = selection_tokens(model_dir, seq_len=calib_seq_len, text=calib_text, seed=seed)
    if to == "gqa":
        calib = None
    else:
        check_calibration_batches(calib, cfg.vocab_size)
    report: dict = {}
    ds = dict(target=target, head_size=head_size) if fmt == "deepseek" else {}
    write = dict(tokenizer_from=model_dir, force=force, sources=(model_dir,))
    if stream:
        ranks, alloc, sel = [kv_lora_rank] * cfg.num_layers, None, None
        if freqfold == AUTO:  # one scoring walk over the layers, then the conversion with the chosen group
            cands = _freqfold_candidates(spec, to, rope_dim, rope_repeat)
            sel = selection(stream_select_nll(src, calib, select_tokens,
                                              {f: _layer_converter(to, dict(opts, freqfold=f), ranks) for f in cands},
                                              progress=progress), select_tokens)
            opts = dict(opts, freqfold=sel["chosen"])
        if per_layer:  # a first pass for every layer's spectrum, then the conversion with its rank
            ranks, alloc = _stream_ranks(src, calib, to, opts, progress)
        new, stats, report = stream_convert(src, out, convert_layer=_layer_converter(to, opts, ranks), calib=calib,
                                            fmt=fmt, dtype=DTYPES[dtype], sequential=calib_pass == "sequential",
                                            progress=progress, refit=refit,
                                            layer_ranks=ranks if len(set(ranks)) > 1 else None, **ds, **write)
        if alloc is not None:
            stats["rank_alloc"] = alloc
        if sel is not None:
            stats["freqfold_select"] = sel
        target_spec = new.spec.replace(latent_dim=max(ranks)) if new.spec.is_latent else new.spec
    else:
        if freqfold == AUTO:
            new, stats = _convert_auto(model, to, calib, None, calib_pass, opts, select_tokens, progress, refit)
        else:
            new, stats = _convert_checked(model, to, calib, None, calib_pass, opts, progress, refit)
        write_checkpoint(new, out, fmt=fmt, dtype=DTYPES[dtype], report=report, **ds, **write)
        target_spec = new.spec
    layer_ranks = stats.get("layer_ranks")
    return ConvertResult(source=spec, target=target_spec, num_layers=cfg.num_layers, out=out,
                         seconds=time.time() - t0, stats=stats, export=report,
                         layer_ranks=list(layer_ranks) if layer_ranks and len(set(layer_ranks)) > 1 else None)


def _stream_ranks(src: LazyCheckpoint | ModelLayers, calib, to: str, opts: dict, progress: bool) -> tuple[list[int], dict]:
    """Per-layer latent ranks by energy (ranks.py), from a first streaming pass over the layers' spectra."""
    h_c = 1 if to == "mla" else opts["latent_heads"]
    kw = dict(latent_heads=h_c, rope_dim=opts["rope_dim"], freqfold=opts["freqfold"], method=opts["method"],
              fit=opts["fit"], rope_repeat=opts.get("rope_repeat", 1))
    lam, to_ = opts.get("calib_shrinkage", 0.0), opts.get("calib_shrink_to", "identity")
    spectra = stream_layers(src, calib, lambda i, shell, moments: layer_spectra(
        shell, [shrink_moment(m, lam, to_) for m in moments], **kw)[0], progress=progress)
    return allocate_ranks(spectra, budget=opts["kv_lora_rank"], rank_min=resolve_rank_min(opts["rank_min"]),
                          cap=max_latent_dim(src.config.attention, h_c, opts["rope_dim"]),
                          relative=opts["rank_alloc"] == "relative")
