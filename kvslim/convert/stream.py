"""Streaming conversion: one decoder layer in memory at a time (issue 16, "Scale").

Peak memory is about the embeddings + one layer (with the converter's working copies of it) +
the calibration hidden states ``[N, T, D]``, whatever the depth, so a 7-8B model converts on a
machine that could not hold it in float32 (benchmarks/convert_memory.py measures it).

**Why it is exact.** The in-memory conversion (pipeline.py) calibrates every layer on the
*source* model's activations (one forward of the source with hooks, calib.py), then converts
each layer from its own weights and its own input moment; the converters change attention
only and copy (DeepSeek: rescale) the rest. So layer ``i`` of the result depends on source
layers ``0..i`` alone, and streaming computes exactly that, in the same order:

1. embed the calibration windows, in batches of ``CALIB_BATCH`` (the in-memory pass's);
2. for each layer ``i``: read it (``LazyCheckpoint.layer``: a one-layer model around it), run
   the hidden states through it (its attention input adds to ``Σ_i``, as calib.py's hook does),
   convert that one-layer model with the same converter (``convert_layer``), write its tensors
   under ``model.layers.i.`` and free it;
3. the tensors outside the layers are read and written one at a time.

**Sequential calibration** (``calib_pass="sequential"``, sequential.py) changes step 2 only: the
moment ``Σ_i`` is taken first, and the hidden states then go through the *converted* layer ``i``
instead of the source's, so every layer is calibrated on the activations the converted model will
feed it; the same walk converts an in-memory model (``ModelLayers``), so the two stay byte-identical.

A conversion that must see every layer before converting any (per-layer ranks by energy,
ranks.py) first walks the layers once with :func:`stream_layers` (the same moments, so the
same choices as in memory), keeps only what it needs (the spectra), then converts: twice the
calibration forwards and fits, the same peak memory.

The file is laid out as ``save_file`` would lay out the whole state dict, so the output is
byte-identical to the in-memory conversion's (tests/test_convert_stream.py), through the
same crash-safe writer (``write_model_dir`` with ``write_weights``).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import closing

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from kvslim.checkpoint import _failpoint, state_dict_for_save, write_model_dir
from kvslim.convert.calib import MomentSum
from kvslim.convert.common import positions
from kvslim.convert.deepseek import deepseek_config, deepseek_ends, deepseek_state, fp16_check, fp16_error
from kvslim.convert.export import hf_llama_config, kvslim_config
from kvslim.convert.select import nll_sum
from kvslim.convert.tensorio import LazyCheckpoint, SafetensorsWriter
from kvslim.layers import RMSNorm
from kvslim.model import ModelConfig, Transformer
from kvslim.runtime import dtype_name

__all__ = ["CALIB_BATCH", "stream_convert", "stream_layers", "stream_select_nll"]

CALIB_BATCH = 4  # windows per forward, in both paths: the moments are then bit-identical
_EMB, _NORM, _HEAD = "model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"
_PRE = "model.layers.0."


def _layer_parts(new: Transformer, fmt: str, dtype: torch.dtype, target: str, head_size) -> tuple[dict, dict]:
    """(layer-0 tensors as written, DeepSeek report or {}) of a converted one-layer model."""
    if fmt == "deepseek":
        sd, _, info = deepseek_state(new, target=target, head_size=head_size)
    else:
        sd, info = state_dict_for_save(new, dtype), {}
    return {k: v.to(dtype).contiguous() for k, v in sd.items() if k.startswith(_PRE)}, info


def _ends(fmt: str, cfg) -> dict[str, tuple[str, float | None]]:
    """{written name: (source name, DeepSeek factor or None)} of the tensors outside the layers."""
    if fmt == "deepseek":
        return dict(deepseek_ends(cfg))
    names = [_EMB, _NORM] + ([] if cfg.tie_word_embeddings else [_HEAD])
    return {n: (n, None) for n in names}


def _merge_report(infos: list[dict], num_layers: int, fp16_err: float) -> dict:
    """One layer-by-layer DeepSeek report as :func:`deepseek_state` + ``save_deepseek`` give it for the model."""
    rep = dict(infos[0])
    rep["cost"] = rep["layout"].cost(num_layers)
    for k in ("norm_weight_log2", "input_norm_shift_log2"):
        rep[k] = (min(i[k][0] for i in infos), max(i[k][1] for i in infos))
    rep["latent_norm_nonlinearity"] = max(i["latent_norm_nonlinearity"] for i in infos)
    rep.update(fp16_check(fp16_err, rep["norm_weight_log2"]))
    return rep


def _forward(layer, x: torch.Tensor) -> torch.Tensor:
    """``layer``'s output for hidden states ``x [B, T, D]`` at positions ``0..T-1`` (as Transformer.forward)."""
    return layer(x, positions(x), None)


def _calibrate(shell: Transformer, hidden: list[torch.Tensor], advance: bool):
    """The shell's attention-input moment over ``hidden``: ``E[x̃x̃ᵀ]``, or a ``QKNormMoment`` for a QK-norm
    source (calib.py ``MomentSum``, as the in-memory pass); with ``advance``, ``hidden`` also goes through the
    shell's layer, in place (one forward gives both, as calib.py's hook does)."""
    layer = shell.model.layers[0]
    total = MomentSum(layer.self_attn)
    if not advance:  # the last layer (nothing reads its output), or a sequential pass (the converted one will)
        for x in hidden:
            total.add(layer.input_layernorm(x))
        return total.mean()

    def hook(module, args):
        total.add(args[0])

    handle = layer.self_attn.register_forward_pre_hook(hook)
    try:
        for b, x in enumerate(hidden):
            hidden[b] = _forward(layer, x)
    finally:
        handle.remove()
    return total.mean()


def _walk(src, calib: torch.Tensor | None, fn: Callable, *, sequential: bool, desc: str, done: str,
          progress: bool, refit: Callable | None = None):
    """Yield ``(i, fn(i, one-layer model of source layer i, [Σ_i] or None))`` for every layer, in order, with
    the calibration hidden states advanced layer by layer (steps 1-2): through source layer ``i`` (the
    ``original`` pass), or, ``sequential``, through the converted layer ``fn`` returned (``fn(...)[0]``, a
    one-layer model), so that ``Σ_{i+1}`` is taken on the activations of the converted layers ``0..i``.

    ``src``: a :class:`LazyCheckpoint`, or anything with its ``config``, ``layer(i)`` and ``tensors([embedding
    name])`` (sequential.py ``ModelLayers``: an in-memory model).
    ``refit``: ``refit(source layer, converted layer, inputs) -> stats`` (refit.py), applied to the converted
    layer ``fn`` returned, on the hidden states layer i's moment was taken on, before they advance; its
    stats are appended to ``fn``'s (one entry per layer).
    """
    t0 = time.time()
    L = src.config.num_layers
    hidden = None
    if calib is not None:
        emb = src.tensors([_EMB])[_EMB]
        hidden = [F.embedding(calib[s : s + CALIB_BATCH], emb) for s in range(0, calib.shape[0], CALIB_BATCH)]
        del emb
    bar = tqdm(range(L), desc=desc, unit="layer", disable=not progress)
    try:
        for i in bar:
            shell = src.layer(i)
            advance = i < L - 1
            inputs = None
            if refit is not None and hidden is not None:  # _calibrate advances hidden in place on the original pass
                inputs = [x.clone() for x in hidden] if advance and not sequential else hidden
            moments = None if hidden is None else [_calibrate(shell, hidden, advance and not sequential)]
            out = fn(i, shell, moments)
            if inputs is not None:
                for k, v in refit(shell.model.layers[0], out[0].model.layers[0], inputs).items():
                    out[1].setdefault(k, []).append(v)
            del shell, moments, inputs
            if sequential and advance and hidden is not None:
                layer = out[0].model.layers[0]
                for b, x in enumerate(hidden):
                    hidden[b] = _forward(layer, x)
                del layer
            yield i, out
            del out
            bar.set_postfix_str(f"layer {i + 1}/{L} {done}, {time.time() - t0:.0f} s")
    finally:
        bar.close()


@torch.no_grad()
def stream_layers(src, calib: torch.Tensor | None, fn: Callable, *, sequential: bool = False,
                  progress: bool = True, refit: Callable | None = None) -> list:
    """``[fn(i, one-layer model of source layer i, moments) for every layer]``, one layer in memory at a time.

    The pass a conversion needs before it can convert any layer, e.g. the spectra of every layer
    that ``rank_alloc="energy"`` allocates ranks on (ranks.py); the moments are those
    :func:`stream_convert` computes. ``sequential``: ``fn`` converts (it returns ``(converted one-layer
    model, ...)``) and each layer's moments are taken after the converted layers before it (:func:`_walk`);
    ``refit`` (needs a converting ``fn``) refits each converted layer (:func:`_walk`, refit.py).
    """
    desc = "convert (sequential)" if sequential else "calibrate (streaming)"
    if refit is not None:
        desc = "convert + refit" + (" (sequential)" if sequential else "")
    with closing(_walk(src, calib, fn, sequential=sequential, desc=desc, done="read", progress=progress,
                       refit=refit)) as walk:
        return [out for _, out in walk]


@torch.no_grad()
def stream_select_nll(src, calib: torch.Tensor, select: torch.Tensor, converters: dict, progress: bool = True) -> dict:
    """``{key: mean next-token NLL of select [N, T]}`` of each candidate conversion, one layer in memory at a time.

    ``converters``: ``{key: fn(i, one-layer model, [Σ_i]) -> (converted one-layer model, stats)}``; every
    candidate is fit on the same moments (the original pass over ``calib``, as :func:`stream_convert`), and the
    selection windows go through each candidate's converted layers, then the final norm and LM head. What
    ``freqfold="auto"`` scores (select.py) without holding the model: the same numbers as the in-memory
    ``window_nll`` of each converted model, to float rounding.
    """
    cfg = src.config
    emb = src.tensors([_EMB])[_EMB]
    batches = [select[s : s + CALIB_BATCH] for s in range(0, select.shape[0], CALIB_BATCH)]
    sel = {k: [F.embedding(b, emb) for b in batches] for k in converters}
    del emb

    def step(i, shell, moments):
        for k, convert in converters.items():
            layer = convert(i, shell, moments)[0].model.layers[0]
            sel[k] = [_forward(layer, x) for x in sel[k]]

    for _ in _walk(src, calib, step, sequential=False, desc="freqfold auto (streaming)", done="scored",
                   progress=progress):
        pass
    ends = src.tensors([_NORM, _EMB if cfg.tie_word_embeddings else _HEAD])
    norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
    norm.weight.copy_(ends[_NORM])
    head = ends[_EMB if cfg.tie_word_embeddings else _HEAD]
    out = {}
    for k, hidden in sel.items():
        tot, n = 0.0, 0
        for b, x in zip(batches, hidden):
            t, m = nll_sum(F.linear(norm(x), head), b)
            tot, n = tot + t, n + m
        out[k] = tot / n
    return out


@torch.no_grad()
def stream_convert(src: LazyCheckpoint, out, *, convert_layer: Callable, calib: torch.Tensor | None, fmt: str,
                   dtype: torch.dtype, target: str = "transformers", head_size: int | None = None,
                   layer_ranks: list[int] | None = None, sequential: bool = False, progress: bool = True,
                   refit: Callable | None = None, **write) -> tuple[Transformer, dict, dict]:
    """Convert ``src`` layer by layer into ``out`` (module docstring); nothing is left at ``out`` on error.

    Args:
        src: the source, read lazily.
        out: the output directory (checked by the caller; ``write`` = ``force``, ``sources``,
            ``tokenizer_from`` of :func:`kvslim.checkpoint.write_model_dir`).
        convert_layer: ``fn(i, model, moments) -> (converted model, stats)``, the in-memory
            converter, applied to the one-layer model of layer ``i`` (``moments``: a one-element
            list, or None).
        calib: ``[N, T]`` calibration windows (None: the target needs none, e.g. gqa).
        fmt, dtype, target, head_size: as ``write_checkpoint``.
        layer_ranks: the converted layers' latent dims, when they differ (``ModelConfig.layer_ranks``;
            format ``kvslim`` only): ``convert_layer(i, ...)`` must give layer i that rank.
        sequential: calibrate layer i on the activations of the *converted* layers ``0..i-1``
            (sequential.py) instead of the source's.
        refit: refit each converted layer on its calibration inputs before writing it (:func:`_walk`, refit.py).
    Returns:
        ``(converted layer 0 as a one-layer model, stats over all layers, DeepSeek report or {})``.
    """
    cfg = src.config
    L = cfg.num_layers
    if layer_ranks is not None and fmt != "kvslim":
        raise ValueError(f"per-layer latent ranks are written in format 'kvslim' only, not {fmt!r}")
    ends = _ends(fmt, cfg)
    state: dict = {"stats": {}, "infos": [], "fp16": 0.0}

    def weights(staging):
        writer = None
        walk = _walk(src, calib, convert_layer, sequential=sequential, desc="convert (streaming)", done="written",
                     progress=progress, refit=refit)
        try:
            for i, (new, stats) in walk:
                tensors, info = _layer_parts(new, fmt, dtype, target, head_size)
                if writer is None:
                    state["layer0"] = new
                    writer = _open(staging, src, new, tensors, info, ends, fmt, dtype, target, state, layer_ranks)
                del new
                for k, v in tensors.items():
                    writer.write(f"model.layers.{i}." + k[len(_PRE):], v)
                    if fmt == "deepseek":
                        state["fp16"] = max(state["fp16"], fp16_error(v))
                del tensors
                for k, v in stats.items():
                    state["stats"].setdefault(k, []).extend(v)
                if info:
                    state["infos"].append(info)
                _failpoint(f"stream-layer-{i}")
            writer.close()
        finally:
            walk.close()
            if writer is not None:
                writer.abort()

    write_model_dir(out, write_weights=weights, config=lambda: state["config"], **write)
    report = _merge_report(state["infos"], L, state["fp16"]) if fmt == "deepseek" else {}
    return state["layer0"], state["stats"], report


END_CHUNK_ROWS = 4096  # rows of an embedding/head cast at a time (D=4096: 128 MB of float64)


def _end_tensor(t: torch.Tensor, factor: float | None, dtype: torch.dtype) -> torch.Tensor:
    """A tensor outside the layers as written: as read (``t``, any float dtype), cast to float32 (what the
    in-memory model holds), then for DeepSeek in float64 times ``factor`` (as deepseek_state), cast to
    ``dtype``. Elementwise, so done ``END_CHUNK_ROWS`` rows at a time into the output: the same values
    with one output-dtype copy (an 8B model's 0.5G-element embedding: 1 GB in bf16) and no whole fp32 or
    fp64 copy besides ``t``."""
    out = torch.empty(t.shape, dtype=dtype)
    for s in range(0, max(t.shape[0], 1), END_CHUNK_ROWS):
        x = t[s : s + END_CHUNK_ROWS].to(torch.float32)
        if factor is not None:
            x = x.double().mul_(factor)
        out[s : s + END_CHUNK_ROWS] = x.to(dtype)
    return out


def _layer_layout(cfg, spec, dtype: torch.dtype) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
    """``{layer-0 name: (dtype, shape)}`` of a kvslim-format layer with attention ``spec``."""
    one = ModelConfig(**{**cfg.to_dict(), "attention": spec, "num_layers": 1, "vocab_size": 1, "layer_ranks": None})
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in Transformer(one).state_dict().items() if k.startswith(_PRE)}
    return {k: (dtype, v) for k, v in shapes.items()}


def _open(staging, src: LazyCheckpoint, new: Transformer, tensors: dict, info: dict, ends: dict, fmt: str,
          dtype: torch.dtype, target: str, state: dict, layer_ranks: list[int] | None = None) -> SafetensorsWriter:
    """Plan the whole file from layer 0's tensors (and, with per-layer ranks, each rank's shapes), set the
    config, write the tensors outside the layers."""
    if layer_ranks is None:
        cfg = src.config.with_attention(new.spec)  # what the in-memory conversion's model has
        per_layer = [{k: (v.dtype, tuple(v.shape)) for k, v in tensors.items()}] * src.config.num_layers
    else:
        cfg = src.config.with_attention(new.spec.replace(latent_dim=max(layer_ranks)), layer_ranks)
        by_rank = {r: _layer_layout(src.config, new.spec.replace(latent_dim=r), dtype) for r in set(layer_ranks)}
        per_layer = [by_rank[r] for r in layer_ranks]
    if fmt == "deepseek":
        state["config"] = {**deepseek_config(cfg, info["layout"], target), "torch_dtype": dtype_name(dtype)}
    elif fmt == "hf":
        state["config"] = hf_llama_config(cfg, dtype)
    else:
        state["config"] = kvslim_config(cfg)
    layout = {f"model.layers.{i}." + k[len(_PRE):]: v for i in range(cfg.num_layers) for k, v in per_layer[i].items()}
    layout.update({name: (dtype, src.shapes[s]) for name, (s, _) in ends.items()})
    writer = SafetensorsWriter(staging / "model.safetensors", layout, {"format": "pt"})
    try:
        for name, (s, factor) in ends.items():
            t = _end_tensor(src.tensors([s], dtype=None)[s], factor, dtype)
            writer.write(name, t)
            if fmt == "deepseek":
                state["fp16"] = max(state["fp16"], fp16_error(t))
            del t
    except BaseException:
        writer.abort()
        raise
    return writer
