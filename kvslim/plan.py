"""Deployment planner: KV bytes, arithmetic intensity, TP duplication, roofline, capacity.

Implements the formulas of DESIGN.md §2 (seed 000 §3.1–3.3, Tab. 1 and Tab. 5) as pure
functions of an :class:`~kvslim.spec.AttentionSpec` and a deployment. Every shape is read
from the spec; nothing here knows per-variant constants.

Conventions (docs/plan.md has the derivations and a worked example):

* FLOPs of one decode step of one layer on one device, with absorbed/tied attention
  (DESIGN.md §6 "measure like the papers"): ``2·B·q_len·(h_q/N)·L·(d_qk + d_v)`` where
  ``d_qk = nope_dim + shared_rope_dim`` and ``d_v = state_dim`` (MHA/GQA: ``d_h`` and
  ``d_h``; GTA: ``d_h/2 + d_h/2`` and ``d_h``; MLA/GLA: ``d_c + d_R`` and ``d_c``).
* Bytes read: the KV rows of the device (``B·L·row_dim_per_rank·sizeof(kv dtype)``) plus
  q and o in the activation dtype (bf16 unless the KV dtype is fp32).
* Arithmetic intensity is reported per byte (the paper's Tab. 1 quantity; ≈ ``2·g_q/m_kv``
  for a 2-byte KV cache at ``L ≫ h_q``) and per element loaded.
* Roofline time = ``max(bytes / bandwidth, FLOPs / peak)`` per layer, times the layers.
  Weights, when given, are counted separately and labelled as such.
* GB and TB/s are decimal (1e9, 1e12).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from kvslim.spec import AttentionSpec

DTYPE_BYTES = {"bf16": 2, "fp16": 2, "fp8": 1, "fp32": 4}


@dataclass(frozen=True)
class GPU:
    """Roofline parameters of one device: bandwidth in TB/s, dense peak in TFLOP/s, memory in GB."""

    name: str
    bandwidth_tbs: float
    tflops: float
    memory_gb: float

    def __post_init__(self) -> None:
        for f in ("bandwidth_tbs", "tflops", "memory_gb"):
            v = getattr(self, f)
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v) or not v > 0:
                raise ValueError(f"GPU.{f} must be a finite positive number, got {v!r}")

    @property
    def ridge(self) -> float:
        """FLOP/byte above which a kernel is compute-bound."""
        return self.tflops / self.bandwidth_tbs


GPUS = {
    "h100": GPU("H100 SXM", 3.35, 989.0, 80.0),
    "h200": GPU("H200", 4.8, 989.0, 141.0),
    # DESIGN.md §2: measured on the lent H100 (device copy, bf16 GEMM).
    "h100-measured": GPU("H100 (measured)", 3.0, 790.0, 80.0),
}


def get_gpu(gpu: str | GPU) -> GPU:
    if isinstance(gpu, GPU):
        return gpu
    key = gpu.lower().strip() if isinstance(gpu, str) else gpu
    if key not in GPUS:
        raise ValueError(f"gpu must be one of {sorted(GPUS)} or a GPU(...), got {gpu!r}")
    return GPUS[key]


def dtype_bytes(dtype: str) -> int:
    if dtype not in DTYPE_BYTES:
        raise ValueError(f"dtype must be one of {sorted(DTYPE_BYTES)}, got {dtype!r}")
    return DTYPE_BYTES[dtype]


def decode_dims(spec: AttentionSpec) -> tuple[int, int]:
    """(d_qk, d_v) of the decode computation: per query head, dot-product and value widths."""
    return spec.nope_dim + spec.shared_rope_dim, spec.state_dim


@dataclass(frozen=True)
class PlanResult:
    """Everything :func:`plan` derives; sizes are per layer per device unless named otherwise."""

    spec: AttentionSpec
    batch: int
    context: int
    q_len: int
    tp: int
    dtype: str
    gpu: GPU
    num_layers: int
    weights_bytes: int | None
    mem_util: float
    # cache shape
    elems_per_token: int  # whole layer (TP=1)
    elems_per_token_device: int
    bytes_per_token: int
    bytes_per_token_device: int
    duplication: int
    # one decode step, one layer, one device
    flops_layer: float
    kv_bytes_layer: int
    qo_bytes_layer: int
    time_layer_s: float
    # whole model
    cache_bytes_device: int  # batch x context x layers on one device
    time_attn_s: float  # attention only (KV + q + o), all layers
    time_with_weights_s: float | None  # attention + weights read / weight GEMMs
    max_sequences: int
    max_tokens: int
    label: str | None = None  # shown instead of the spec's name (e.g. "gta-4@vllm")
    # per-layer latent ranks (MLA/GLA): the per-layer fields above are then means over the layers
    layer_ranks: tuple[int, ...] | None = None
    bytes_per_token_all_layers_device: int = 0  # KV bytes one token takes on one device, summed over layers

    @property
    def name(self) -> str:
        if self.label:
            return self.label
        if self.layer_ranks:
            return f"{self.spec.name} (ranks {min(self.layer_ranks)}-{max(self.layer_ranks)})"
        return self.spec.name

    @property
    def group_size(self) -> int:
        return self.spec.group_size

    @property
    def m_kv(self) -> int:
        return self.spec.m_kv

    @property
    def redundancy_free(self) -> bool:
        return self.duplication == 1

    @property
    def bytes_layer(self) -> int:
        return self.kv_bytes_layer + self.qo_bytes_layer

    @property
    def ai_per_byte(self) -> float:
        return self.flops_layer / self.bytes_layer

    @property
    def ai_per_element(self) -> float:
        act = _act_bytes(self.dtype)
        kv_elems = self.batch * self.context * self.elems_per_token_device
        elems = kv_elems + self.qo_bytes_layer / act
        return self.flops_layer / elems

    @property
    def ai_approx(self) -> float:
        """Seed 000 Tab. 1: ≈ 2·g_q/m_kv FLOP/byte for a 2-byte cache, L ≫ h_q."""
        return 2 * self.group_size / self.m_kv

    @property
    def bound(self) -> str:
        return "compute" if self.ai_per_byte > self.gpu.ridge else "memory"

    @property
    def cache_bytes_total(self) -> int:
        """Cache over all TP ranks (replicated state counted on every rank)."""
        return self.cache_bytes_device * self.tp


def _act_bytes(dtype: str) -> int:
    # q and o stay in the compute dtype; an fp8 cache is read into bf16 math.
    return 4 if dtype == "fp32" else 2


def _check_int(name: str, value, minimum: int = 1) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")


def plan(
    spec: AttentionSpec,
    *,
    batch: int,
    context: int,
    q_len: int = 1,
    tp: int = 1,
    dtype: str = "bf16",
    gpu: str | GPU = "h100",
    num_layers: int = 32,
    weights_bytes: int | None = None,
    mem_util: float = 0.9,
    label: str | None = None,
    layer_ranks: Sequence[int] | None = None,
) -> PlanResult:
    """Plan one decode deployment of ``spec``.

    Args:
        spec: attention shapes of one layer.
        batch: concurrent sequences ``B`` in the step.
        context: KV length ``L`` read by each sequence (including the new tokens).
        q_len: new tokens per sequence per step (1 = plain decode; >1 = speculative/MTP).
        tp: tensor-parallel ranks ``N``; must divide ``h_q`` and be compatible with the
            state heads (``spec.check_tp``).
        dtype: KV-cache dtype, one of ``bf16, fp16, fp8, fp32``; ``fp8`` is the packed row of
            :mod:`kvslim.rows` (e4m3 values, an fp32 scale per token per 128-channel tile, the
            RoPE key of tied kinds in bf16: MLA 656 B vs 1152 B per token per layer).
        gpu: preset name (``h100, h200, h100-measured``) or a :class:`GPU`.
        num_layers: attention layers of the model.
        weights_bytes: total model weight bytes (all ranks); if given, the step time with
            weights is reported and the per-device share (``/tp``) is taken from memory.
        mem_util: fraction of device memory usable for weights + cache.
        label: the name tables show (default ``spec.name``).
        layer_ranks: per-layer latent dims of an MLA/GLA model (``ModelConfig.layer_ranks``, one per
            layer): bytes/token, FLOPs and time are summed over the layers, each with its own
            ``latent_dim``; the per-layer fields of the result are then means over the layers.
    """
    if not isinstance(spec, AttentionSpec):
        raise TypeError(f"spec must be an AttentionSpec, got {type(spec).__name__}")
    _check_int("batch", batch)
    _check_int("context", context)
    _check_int("q_len", q_len)
    if q_len > context:
        raise ValueError(f"q_len={q_len} must be <= context={context}")
    _check_int("tp", tp)
    if spec.num_heads % tp:
        raise ValueError(f"tp={tp} must divide num_heads={spec.num_heads}")
    try:
        spec.check_tp(tp)
    except ValueError as e:
        raise ValueError(f"tp={tp} is not valid for {spec.name}: {e}") from None
    dtype_bytes(dtype)
    gpu = get_gpu(gpu)
    _check_int("num_layers", num_layers)
    if weights_bytes is not None and (not isinstance(weights_bytes, (int, float)) or weights_bytes < 0):
        raise ValueError(f"weights_bytes must be >= 0 or None, got {weights_bytes!r}")
    if not isinstance(mem_util, (int, float)) or not 0 < mem_util <= 1:
        raise ValueError(f"mem_util must be in (0, 1], got {mem_util!r}")

    specs = _layer_specs(spec, num_layers, layer_ranks)
    heads_dev = spec.num_heads // tp
    bw, peak = gpu.bandwidth_tbs * 1e12, gpu.tflops * 1e12
    # (elems, elems/device, bytes, bytes/device, flops, kv bytes, q+o bytes, time) of one layer of each spec
    per_spec = {}
    for s in dict.fromkeys(specs):
        row_bytes_dev = s.row_format(dtype, tp).row_bytes
        d_qk, d_v = decode_dims(s)
        flops = 2.0 * batch * q_len * heads_dev * context * (d_qk + d_v)
        kv_bytes = batch * context * row_bytes_dev
        qo_bytes = batch * q_len * heads_dev * (d_qk + d_v) * _act_bytes(dtype)
        t_layer = max((kv_bytes + qo_bytes) / bw, flops / peak)
        per_spec[s] = (s.row_dim, s.row_dim_per_rank(tp), s.row_format(dtype, 1).row_bytes, row_bytes_dev,
                       flops, kv_bytes, qo_bytes, t_layer)
    counts = {s: specs.count(s) for s in per_spec}
    total = [sum(counts[s] * v[k] for s, v in per_spec.items()) for k in range(8)]
    mean = next(iter(per_spec.values())) if len(per_spec) == 1 else [  # an int where it divides
        x // num_layers if isinstance(x, int) and x % num_layers == 0 else x / num_layers for x in total]
    row_bytes_all = total[3]  # bytes one token takes on a device over all layers

    time_w, w_dev = None, 0.0
    if weights_bytes is not None:
        w_dev = weights_bytes / tp
        # Weight GEMMs: 2 FLOPs per parameter per token; parameters = bytes / sizeof.
        w_flops = 2.0 * (w_dev / _act_bytes(dtype)) * batch * q_len
        time_w = max((total[5] + total[6] + w_dev) / bw, (total[4] + w_flops) / peak)

    per_seq = context * row_bytes_all
    avail = mem_util * gpu.memory_gb * 1e9 - w_dev
    max_seqs = max(0, math.floor(avail / per_seq))
    max_tokens = max(0, math.floor(avail / row_bytes_all))
    return PlanResult(
        spec=spec, batch=batch, context=context, q_len=q_len, tp=tp, dtype=dtype, gpu=gpu, num_layers=num_layers,
        weights_bytes=weights_bytes, mem_util=float(mem_util),
        elems_per_token=mean[0], elems_per_token_device=mean[1], bytes_per_token=mean[2],
        bytes_per_token_device=mean[3], duplication=spec.duplication(tp),
        flops_layer=mean[4], kv_bytes_layer=mean[5], qo_bytes_layer=mean[6], time_layer_s=mean[7],
        cache_bytes_device=batch * per_seq, time_attn_s=total[7], time_with_weights_s=time_w,
        max_sequences=max_seqs, max_tokens=max_tokens, label=label,
        layer_ranks=None if layer_ranks is None else tuple(layer_ranks), bytes_per_token_all_layers_device=row_bytes_all,
    )


def _layer_specs(spec: AttentionSpec, num_layers: int, layer_ranks) -> list[AttentionSpec]:
    """One spec per layer: ``spec`` everywhere, or ``spec`` with each layer's ``latent_dim``."""
    if layer_ranks is None:
        return [spec] * num_layers
    if not spec.is_latent:
        raise ValueError(f"layer_ranks (per-layer latent dims) apply to mla/gla, not {spec.kind}")
    ranks = list(layer_ranks) if isinstance(layer_ranks, (list, tuple)) else None
    if ranks is None or len(ranks) != num_layers:
        raise ValueError(f"layer_ranks must list num_layers={num_layers} latent dims, got {layer_ranks!r}")
    if any(isinstance(r, bool) or not isinstance(r, int) or r <= 0 for r in ranks):
        raise ValueError(f"layer_ranks must hold positive ints, got {ranks}")
    return [spec.replace(latent_dim=r) for r in ranks]


def _gb(x: float) -> str:
    return f"{x / 1e9:.3g} GB"


def _us(t: float) -> str:
    return f"{t * 1e6:.1f} us"


def format_plan(r: PlanResult) -> str:
    """Human-readable report of one :class:`PlanResult`."""
    s, g = r.spec, r.gpu
    d_qk, d_v = decode_dims(s)
    state = str(s.state_dim)
    if r.layer_ranks:  # per-layer latent dims: the widths span a range
        lo = s.replace(latent_dim=min(r.layer_ranks))
        state = f"{lo.state_dim}..{s.state_dim}"
        d_qk, d_v = f"{decode_dims(lo)[0]}..{d_qk}", f"{decode_dims(lo)[1]}..{d_v}"
    rows = [
        ("KV per token per layer", f"{r.elems_per_token} elements, {r.bytes_per_token} bytes"),
        (
            "KV per token per layer per device",
            f"{r.elems_per_token_device} elements, {r.bytes_per_token_device} bytes",
        ),
        ("KV per token, all layers, device", f"{r.bytes_per_token_all_layers_device} bytes"),
        (
            "cache for B x L, all layers",
            f"{_gb(r.cache_bytes_device)} per device, {_gb(r.cache_bytes_total)} over {r.tp} device(s)",
        ),
        (
            "duplication D = ceil(N*g_q/h_q)",
            f"{r.duplication} ("
            + ("redundancy-free" if r.redundancy_free else f"state replicated on {r.duplication} ranks")
            + ")",
        ),
        ("decode dims d_qk / d_v", f"{d_qk} / {d_v}"),
        (
            "arithmetic intensity",
            (
                f"{r.ai_per_byte:.2f} FLOP/byte, {r.ai_per_element:.2f} FLOP/element (~2*g_q/m_kv = "
                f"{r.ai_approx:g}; ridge {g.ridge:.0f} FLOP/byte -> {r.bound}-bound)"
            ),
        ),
        (
            "roofline, attention only",
            f"{_us(r.time_layer_s)} per layer, {_us(r.time_attn_s)} per step ({r.num_layers} layers)",
        ),
    ]
    if r.time_with_weights_s is not None:
        rows.append(
            (
                "roofline, attention + weights",
                (
                    f"{_us(r.time_with_weights_s)} per step (weights {_gb(r.weights_bytes)} total, "
                    f"{_gb(r.weights_bytes / r.tp)} per device)"
                ),
            )
        )
    rows.append(
        (
            f"capacity at mem-util {r.mem_util:g}",
            f"{r.max_sequences} sequences of L={r.context} ({r.max_tokens} tokens) per device"
            + ("" if r.weights_bytes is not None else ", weights not counted"),
        )
    )
    if r.layer_ranks:
        rows.insert(0, ("latent dims per layer", f"{', '.join(map(str, r.layer_ranks))} (per-layer sizes below "
                                                  "are means over the layers)"))
    width = max(len(k) for k, _ in rows) + 2
    lines = [
        (
            f"{s.name}: {s.kind}, h_q={s.num_heads}, d_h={s.head_dim}, state heads={s.num_state_heads}"
            f" x {state}, shared rope={s.shared_rope_dim}, g_q={r.group_size}, m_kv={r.m_kv}"
        ),
        (
            f"deployment: B={r.batch}, L={r.context}, q_len={r.q_len}, TP={r.tp}, {r.dtype}, "
            f"{r.num_layers} layers, {g.name} ({g.bandwidth_tbs} TB/s, {g.tflops:g} TFLOP/s, {g.memory_gb:g} GB)"
        ),
        "",
        *(f"{k + ':':<{width}}{v}" for k, v in rows),
    ]
    return "\n".join(lines)


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]

    def fmt(row):
        return "  ".join(str(x).rjust(w) if i else str(x).ljust(w) for i, (x, w) in enumerate(zip(row, widths)))

    return "\n".join([fmt(header), fmt(["-" * w for w in widths]), *map(fmt, rows)])


def format_table(results: Sequence[PlanResult]) -> str:
    """One row per result (variant x TP), plus a Tab. 5-style bytes/token pivot if TPs differ."""
    if not results:
        raise ValueError("results must not be empty")
    r0 = results[0]
    with_w = any(r.time_with_weights_s is not None for r in results)
    header = [
        "variant",
        "TP",
        "g_q",
        "m_kv",
        "elems/tok/dev",
        "bytes/tok/dev",
        "D",
        "red.-free",
        "AI FLOP/B",
        "AI FLOP/el",
        "cache/dev",
        "attn step",
    ]
    header += ["step+weights"] if with_w else []
    header += ["max seqs"]
    rows = []
    for r in results:
        row = [
            r.name,
            r.tp,
            r.group_size,
            r.m_kv,
            r.elems_per_token_device,
            r.bytes_per_token_device,
            r.duplication,
            "yes" if r.redundancy_free else "no",
            f"{r.ai_per_byte:.2f}",
            f"{r.ai_per_element:.2f}",
            _gb(r.cache_bytes_device),
            _us(r.time_attn_s),
        ]
        if with_w:
            row.append(_us(r.time_with_weights_s) if r.time_with_weights_s is not None else "-")
        rows.append(row + [r.max_sequences])
    head = (
        f"B={r0.batch}, L={r0.context}, q_len={r0.q_len}, {r0.dtype}, {r0.num_layers} layers, "
        f"{r0.gpu.name} ({r0.gpu.bandwidth_tbs} TB/s, {r0.gpu.tflops:g} TFLOP/s, {r0.gpu.memory_gb:g} GB), "
        f"mem-util {r0.mem_util:g}; per-layer sizes, roofline step = attention KV+q+o read"
    )
    out = [head, "", _table(header, rows)]
    tps = sorted({r.tp for r in results})
    if len(tps) > 1:
        names = list(dict.fromkeys(r.name for r in results))
        by = {(r.name, r.tp): r.bytes_per_token_device for r in results}
        pivot = [[n] + [by.get((n, t), "-") for t in tps] for n in names]
        out += [
            "",
            f"KV bytes per token per layer per device ({r0.dtype}):",
            "",
            _table(["variant"] + [f"TP={t}" for t in tps], pivot),
        ]
    return "\n".join(out)


def compare(specs: Sequence[AttentionSpec], *, tp: int | Sequence[int] = 1, **kwargs) -> str:
    """Plan every spec at every TP size (keyword args as :func:`plan`) and return a table."""
    if not specs:
        raise ValueError("specs must not be empty")
    tps = [tp] if isinstance(tp, int) else list(tp)
    if not tps:
        raise ValueError("tp must name at least one size")
    return format_table([plan(s, tp=t, **kwargs) for s in specs for t in tps])


def plot_roofline(results: Sequence[PlanResult], path: str) -> str:
    """Save a log-log roofline (attainable TFLOP/s vs FLOP/byte) with one point per result."""
    if not results:
        raise ValueError("results must not be empty")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    ais = [r.ai_per_byte for r in results]
    lo, hi = min(ais + [1.0]) / 2, max(ais + [r.gpu.ridge for r in results]) * 4
    xs = [lo * (hi / lo) ** (i / 200) for i in range(201)]
    for g, ls in zip(dict.fromkeys(r.gpu for r in results), ["-", "--", ":", "-."] * 4):
        ax.plot(xs, [min(g.tflops, x * g.bandwidth_tbs) for x in xs], "k", ls=ls, label=f"{g.name} roof")
    # Colour per variant, marker per TP size: points of equal AI stay distinguishable.
    colours = {n: f"C{i % 10}" for i, n in enumerate(dict.fromkeys(r.name for r in results))}
    markers = {t: "osD^v<>p*h"[i % 10] for i, t in enumerate(sorted({r.tp for r in results}))}
    for r in results:
        y = r.flops_layer / r.time_layer_s / 1e12
        ax.scatter(
            [r.ai_per_byte],
            [y],
            color=colours[r.name],
            marker=markers[r.tp],
            zorder=3,
            label=f"{r.name} TP={r.tp}",
        )
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("arithmetic intensity (FLOP/byte)")
    ax.set_ylabel("attainable TFLOP/s")
    r0 = results[0]
    ax.set_title(f"decode attention roofline: B={r0.batch}, L={r0.context}, q_len={r0.q_len}, {r0.dtype}")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="upper left", fontsize=7, ncol=2)
    from kvslim.checkpoint import prepare_output_file

    fig.tight_layout()
    fig.savefig(prepare_output_file(path), dpi=120)
    plt.close(fig)
    return path
