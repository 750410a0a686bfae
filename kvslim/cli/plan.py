"""``kvslim plan``: KV bytes/token/device, arithmetic intensity, TP duplication, roofline, capacity."""

from __future__ import annotations

from kvslim.checkpoint import check_output_file
from kvslim.cli.common import add_spec_args, int_list, specs_from_args


def add(subparsers) -> None:
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
    p.add_argument("--tp", type=int_list, default=[1], help="tensor-parallel size(s), e.g. 2 or 1,2")
    p.add_argument("--kv-dtype", "--dtype", dest="dtype", choices=sorted(DTYPE_BYTES), default="bf16",
                   help="KV-cache dtype (fp8: e4m3 with fp32 scales per 128-channel tile, RoPE key in bf16)")
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
    p.add_argument("--layer-ranks", type=int_list, metavar="LIST",
                   help="mla/gla: per-layer latent dims, one per layer (e.g. from `kvslim convert --rank-alloc "
                   "energy`); bytes/token and time are summed over the layers. A kvslim checkpoint's config "
                   "(--hf-config DIR) brings its own")
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
    p.add_argument("--serve-as", choices=["transformers", "vllm", "sglang"],
                   help="plan MLA/GLA/GTA as the DeepSeek MLA checkpoint `kvslim convert --target` writes for "
                   "this server (vllm: padded latent, 64-wide RoPE; kvslim/serving.py); other kinds unchanged")
    p.add_argument("--mla-head-size", type=int, metavar="N",
                   help="with --serve-as: pad kv_lora_rank + qk_rope_head_dim to N (vLLM: 320, 512, 576)")
    p.add_argument("--plot", metavar="PATH", help="save a roofline PNG")
    p.set_defaults(func=run)


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


def run(args) -> int:
    from kvslim.plan import DTYPE_BYTES, format_plan, format_table, plan, plot_roofline

    if args.plot:
        check_output_file(args.plot, flag="--plot")
    if args.compare:
        args.preset = list(args.preset) + [args.compare]
    if args.layer_ranks and not args.kind:
        raise ValueError("--layer-ranks needs --kind mla or gla (a kvslim checkpoint's config brings its own ranks)")
    if args.layer_ranks and args.latent_dim is None:
        args.latent_dim = max(args.layer_ranks)
    chosen = specs_from_args(args)
    labels = [None] * len(chosen)
    if args.mla_head_size is not None and not args.serve_as:
        raise ValueError("--mla-head-size needs --serve-as")
    ranks = [(c or {}).get("layer_ranks") for _, c in chosen]
    if args.layer_ranks:  # the --kind spec, which specs_from_args puts last
        ranks[-1] = args.layer_ranks
    if args.serve_as:
        from kvslim.serving import mla_layout

        for i, (s, c) in enumerate(chosen):
            if ranks[i]:
                raise ValueError("--serve-as: a model with per-layer latent ranks has no DeepSeek MLA export "
                                 "(its config holds one kv_lora_rank); plan it without --serve-as")
            if s.is_tied:
                lay = mla_layout(s, args.serve_as, args.mla_head_size)
                print(f"{s.name}: {lay.describe()}")
                chosen[i], labels[i] = (lay.spec, c), f"{s.name}@{args.serve_as}"
    layers = args.layers
    if layers is None:
        from_cfg = [c.get("num_hidden_layers") for _, c in chosen if c and c.get("num_hidden_layers")]
        layers = from_cfg[0] if from_cfg else (len(args.layer_ranks) if args.layer_ranks else 32)
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
    results = [plan(s, tp=t, label=lab, layer_ranks=r, **kw)
               for (s, _), lab, r in zip(chosen, labels, ranks) for t in args.tp]
    if len(results) == 1 and not args.compare:
        print(format_plan(results[0]))
    else:
        print(format_table(results))
    if args.plot:
        print(f"\nroofline plot: {plot_roofline(results, args.plot)}")
    return 0
