"""The ``kvslim`` command line: argparse subcommands, each a thin call into the library.

To add a subcommand, write ``_add_<name>(subparsers)`` that creates its parser and sets
``func`` (a callable taking the parsed ``args`` and returning an exit code), then append
it to ``_COMMANDS``.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from kvslim.spec import AttentionSpec, preset_names


def _csv(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def _int_list(text: str) -> list[int]:
    try:
        return [int(t) for t in _csv(text)]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated ints, got {text!r}") from None


# ---------------------------------------------------------------- spec selection
def add_spec_args(p: argparse.ArgumentParser, *, multi: bool = False) -> None:
    """Flags that select an AttentionSpec; shared by every subcommand that needs one."""
    g = p.add_argument_group("attention spec (a preset, an HF config, or explicit fields)")
    g.add_argument(
        "--preset",
        action="append",
        default=[],
        metavar="NAME",
        help=f"variant preset, e.g. {', '.join(preset_names())}"
        + ("; repeatable or comma-separated" if multi else ""),
    )
    g.add_argument("--hf-config", metavar="PATH", help="Hugging Face config.json (or its folder)")
    g.add_argument("--kind", help="explicit kind: mha, mqa, gqa, gta, mla, gla")
    g.add_argument("--heads", type=int, help="query heads h_q (also overrides presets; default 16)")
    g.add_argument("--head-dim", type=int, help="head dim d_h (also overrides presets; default 128)")
    g.add_argument("--kv-heads", type=int, help="KV heads h_kv (gqa, gta)")
    g.add_argument("--latent-dim", type=int, help="latent dim d_c per latent head (mla, gla)")
    g.add_argument("--latent-heads", type=int, help="latent heads h_c (gla)")
    g.add_argument("--rope-dim", type=int, help="RoPE dim d_R")
    g.add_argument("--hidden", type=int, help="model width (default heads x head-dim)")


def _load_hf(path: str) -> tuple[AttentionSpec, dict]:
    from kvslim.spec import _as_dict

    cfg = _as_dict(path)
    return AttentionSpec.from_hf_config(cfg), cfg


def specs_from_args(args: argparse.Namespace) -> list[tuple[AttentionSpec, dict | None]]:
    """(spec, hf config or None) for every variant the flags name, in order."""
    shape = {
        k: v
        for k, v in (("num_heads", args.heads), ("head_dim", args.head_dim), ("hidden_size", args.hidden))
        if v is not None
    }
    out: list[tuple[AttentionSpec, dict | None]] = []
    names = [n for item in args.preset for n in _csv(item)]
    for n in names:
        if n.endswith(".json") or os.path.isdir(n):
            out.append(_load_hf(n))
        else:
            out.append((AttentionSpec.preset(n, **shape), None))
    if args.hf_config:
        out.append(_load_hf(args.hf_config))
    if args.kind:
        h_q = args.heads or 16
        d_h = args.head_dim or 128
        fields = {
            "kind": args.kind,
            "hidden_size": args.hidden or h_q * d_h,
            "num_heads": h_q,
            "head_dim": d_h,
            "num_kv_heads": args.kv_heads,
            "latent_dim": args.latent_dim,
            "num_latent_heads": args.latent_heads,
            "rope_dim": args.rope_dim,
        }
        out.append((AttentionSpec(**fields), None))
    elif any(v is not None for v in (args.kv_heads, args.latent_dim, args.latent_heads, args.rope_dim)):
        raise ValueError("--kv-heads/--latent-dim/--latent-heads/--rope-dim need --kind")
    if not out:
        raise ValueError("no attention spec: give --preset, --compare, --hf-config or --kind")
    return out


# ------------------------------------------------------------------------ plan
def _add_plan(subparsers) -> None:
    from kvslim.plan import DTYPE_BYTES, GPUS

    p = subparsers.add_parser(
        "plan",
        help="KV bytes, arithmetic intensity, TP duplication, roofline time and capacity",
        description="Plan a decode deployment: KV bytes/token/device, arithmetic intensity, "
        "duplication under tensor parallelism, roofline step time and max concurrent sequences.",
    )
    add_spec_args(p, multi=True)
    p.add_argument(
        "--compare",
        metavar="LIST",
        help="comma-separated presets (or config.json paths) to print side by side",
    )
    p.add_argument("--batch", type=int, default=1, help="concurrent sequences per step (default 1)")
    p.add_argument("--context", type=int, default=8192, help="KV length per sequence (default 8192)")
    p.add_argument("--q-len", type=int, default=1, help="new tokens per sequence per step (default 1)")
    p.add_argument("--tp", type=_int_list, default=[1], help="tensor-parallel size(s), e.g. 2 or 1,2")
    p.add_argument("--dtype", choices=sorted(DTYPE_BYTES), default="bf16", help="KV-cache dtype")
    p.add_argument(
        "--gpu",
        choices=sorted(GPUS) + ["custom"],
        default="h100",
        help="GPU preset (default h100); 'custom' needs --bandwidth --flops --memory",
    )
    p.add_argument("--bandwidth", type=float, help="memory bandwidth, TB/s (overrides the preset)")
    p.add_argument("--flops", type=float, help="dense peak, TFLOP/s (overrides the preset)")
    p.add_argument("--memory", type=float, help="device memory, GB (overrides the preset)")
    p.add_argument(
        "--layers", type=int, help="attention layers (default: the HF config's num_hidden_layers, else 32)"
    )
    p.add_argument(
        "--params",
        type=float,
        help="model parameters in billions; adds weight reads to the step time and "
        "subtracts weights from memory",
    )
    p.add_argument(
        "--weight-dtype",
        choices=sorted(DTYPE_BYTES),
        default="bf16",
        help="dtype of the weights for --params (default bf16)",
    )
    p.add_argument("--mem-util", type=float, default=0.9, help="usable memory fraction (default 0.9)")
    p.add_argument("--plot", metavar="PATH", help="save a roofline PNG")
    p.set_defaults(func=_run_plan)


def _gpu_from_args(args):
    from kvslim.plan import GPU, get_gpu

    over = {"bandwidth_tbs": args.bandwidth, "tflops": args.flops, "memory_gb": args.memory}
    if args.gpu == "custom":
        missing = [
            f"--{k}"
            for k, v in (("bandwidth", args.bandwidth), ("flops", args.flops), ("memory", args.memory))
            if v is None
        ]
        if missing:
            raise ValueError(f"gpu 'custom' needs {' '.join(missing)}")
        return GPU("custom", **over)
    base = get_gpu(args.gpu)
    if all(v is None for v in over.values()):
        return base
    fields = {k: (v if v is not None else getattr(base, k)) for k, v in over.items()}
    return GPU(f"{base.name} (custom)", **fields)


def _run_plan(args) -> int:
    from kvslim.plan import DTYPE_BYTES, format_plan, format_table, plan, plot_roofline

    if args.compare:
        args.preset = list(args.preset) + [args.compare]
    chosen = specs_from_args(args)
    layers = args.layers
    if layers is None:
        from_cfg = [c.get("num_hidden_layers") for _, c in chosen if c and c.get("num_hidden_layers")]
        layers = from_cfg[0] if from_cfg else 32
    weights = None if args.params is None else int(args.params * 1e9 * DTYPE_BYTES[args.weight_dtype])
    kw = {
        "batch": args.batch,
        "context": args.context,
        "q_len": args.q_len,
        "dtype": args.dtype,
        "gpu": _gpu_from_args(args),
        "num_layers": layers,
        "weights_bytes": weights,
        "mem_util": args.mem_util,
    }
    results = [plan(s, tp=t, **kw) for s, _ in chosen for t in args.tp]
    if len(results) == 1 and not args.compare:
        print(format_plan(results[0]))
    else:
        print(format_table(results))
    if args.plot:
        print(f"\nroofline plot: {plot_roofline(results, args.plot)}")
    return 0


# ------------------------------------------------------------------------ main
_COMMANDS = [_add_plan]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kvslim", description="Fast LLM decoding with smaller KV caches (MHA/MQA/GQA/GTA/MLA/GLA)."
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for add in _COMMANDS:
        add(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except ValueError as e:
        print(f"kvslim {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
