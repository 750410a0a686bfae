"""Flags and parsers shared by several commands: attention-spec selection, number lists."""

from __future__ import annotations

import argparse
import os

from kvslim.checkpoint import FORMAT
from kvslim.hf_config import as_dict
from kvslim.spec import AttentionSpec, preset_names


def csv_list(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def int_list(text: str) -> list[int]:
    try:
        return [int(t) for t in csv_list(text)]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated ints, got {text!r}") from None


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
    g.add_argument("--hf-config", metavar="PATH", help="Hugging Face config.json (or its folder), or a kvslim "
                   "checkpoint's (with its per-layer latent ranks)")
    g.add_argument("--kind", help="explicit kind: mha, mqa, gqa, gta, mla, gla")
    g.add_argument("--heads", type=int, help="query heads h_q (also overrides presets; default 16)")
    g.add_argument("--head-dim", type=int, help="head dim d_h (also overrides presets; default 128)")
    g.add_argument("--kv-heads", type=int, help="KV heads h_kv (gqa, gta)")
    g.add_argument("--latent-dim", type=int, help="latent dim d_c per latent head (mla, gla)")
    g.add_argument("--latent-heads", type=int, help="latent heads h_c (gla)")
    g.add_argument("--rope-dim", type=int, help="RoPE dim d_R")
    g.add_argument("--hidden", type=int, help="model width (default heads x head-dim)")


def _load_hf(path: str) -> tuple[AttentionSpec, dict]:
    """(spec, config dict) of a Hugging Face config or a kvslim checkpoint's config.json.

    A kvslim config yields ``num_hidden_layers`` and its per-layer latent ranks (``layer_ranks``).
    """
    cfg = as_dict(path)
    if cfg.get("format") == FORMAT:
        from kvslim.model import ModelConfig

        mc = ModelConfig.from_dict({k: v for k, v in cfg.items() if k != "format"})
        return mc.attention, {"num_hidden_layers": mc.num_layers, "layer_ranks": mc.layer_ranks}
    return AttentionSpec.from_hf_config(cfg), cfg


def specs_from_args(args: argparse.Namespace) -> list[tuple[AttentionSpec, dict | None]]:
    """(spec, hf config or None) for every variant the flags name, in order."""
    shape = {
        k: v
        for k, v in (("num_heads", args.heads), ("head_dim", args.head_dim), ("hidden_size", args.hidden))
        if v is not None
    }
    out: list[tuple[AttentionSpec, dict | None]] = []
    names = [n for item in args.preset for n in csv_list(item)]
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


def positive_float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not v > 0:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text!r}")
    return v
