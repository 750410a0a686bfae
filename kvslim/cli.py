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


# ------------------------------------------------------------- train / finetune / eval
def _positive_float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not v > 0:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text!r}")
    return v


def _add_loop_args(p: argparse.ArgumentParser, *, steps: int, lr: float, seq_len: int, batch_size: int) -> None:
    """Flags of the shared training loop (kvslim.train.TrainConfig)."""
    g = p.add_argument_group("training loop")
    g.add_argument("--steps", type=int, default=steps, help=f"optimizer steps (default {steps})")
    g.add_argument("--lr", type=float, default=lr, help=f"peak learning rate (default {lr:g})")
    g.add_argument("--min-lr", type=float, help="cosine floor (default lr/10)")
    g.add_argument("--warmup-steps", type=int, help="linear warm-up steps (default min(200, steps/10))")
    g.add_argument("--seq-len", type=int, default=seq_len, help=f"tokens per sequence (default {seq_len})")
    g.add_argument("--batch-size", type=int, default=batch_size, help=f"sequences per micro-batch (default {batch_size})")
    g.add_argument("--grad-accum", type=int, default=1, help="micro-batches per step (default 1)")
    g.add_argument("--weight-decay", type=float, default=0.1, help="AdamW weight decay (default 0.1)")
    g.add_argument("--grad-clip", type=float, default=1.0, help="max gradient norm, 0 = off (default 1.0)")
    g.add_argument("--eval-every", type=int, default=0, help="validate every N steps (default: at the end)")
    g.add_argument("--eval-tokens", type=int, default=131072, help="validation tokens per evaluation")
    g.add_argument("--save-every", type=int, default=0, help="checkpoint every N steps (default: at the end)")
    g.add_argument("--log-every", type=int, default=10, help="record the training loss every N steps")
    g.add_argument("--seed", type=int, default=0, help="seed of the data order (and of the init for train)")
    g.add_argument("--compile", action="store_true", help="torch.compile the model")
    g.add_argument("--dtype", choices=["auto", "bf16", "fp16", "fp32"], default="auto",
                   help="autocast dtype (auto: bf16 on CUDA, fp32 on CPU)")
    g.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N (default auto)")
    g.add_argument("--no-resume", action="store_true", help="ignore an existing checkpoint in OUT/run")
    g.add_argument("--quiet", action="store_true", help="no progress bar")


def _loop_kwargs(args) -> dict:
    return {
        "steps": args.steps, "lr": args.lr, "min_lr": args.min_lr, "warmup_steps": args.warmup_steps,
        "seq_len": args.seq_len, "batch_size": args.batch_size, "grad_accum": args.grad_accum,
        "weight_decay": args.weight_decay, "grad_clip": args.grad_clip, "eval_every": args.eval_every,
        "eval_tokens": args.eval_tokens, "save_every": args.save_every, "log_every": args.log_every,
        "seed": args.seed, "compile": args.compile, "dtype": args.dtype, "device": args.device,
    }


def _print_history(history: dict, out) -> None:
    val = history["val"][-1] if history["val"] else None
    last = history["train"][-1] if history["train"] else None
    print(f"steps {history['step']}, trainable params {history['params']:,}")
    if last:
        print(f"train loss {last['loss']:.4f} ({last['tokens']:,} tokens, {last['elapsed_s']:.1f} s)")
    if val:
        print(f"validation loss {val['loss']:.4f}  ppl {val['ppl']:.3f}" + (f"  KL {val['kl']:.4f}" if "kl" in val else ""))
    if out:
        print(f"model: {out}  (log: {out}/train_log.csv, curves: {out}/curves.png, checkpoints: {out}/run)")


def _add_train(subparsers) -> None:
    p = subparsers.add_parser(
        "train", help="train a small model from an attention spec on a text or token corpus",
        description="Train a kvslim Transformer from scratch: AdamW, warm-up + cosine, bf16 autocast on "
        "CUDA, checkpoints with exact resume, loss/ppl curves (CSV + PNG).",
    )
    add_spec_args(p)
    p.add_argument("--text", default="sotu", help="training data: corpus name (sotu, moby-dick, shakespeare; "
                   "bare name = its non-held-out part), a .txt file, or .npy/.bin token ids (default sotu)")
    p.add_argument("--val-text", default="sotu-eval", help="validation data (default sotu-eval); 'none' = no validation")
    p.add_argument("--tokenizer", default="bpe-8192", help="bpe-N (trained on --text), smollm2, a tokenizer dir or "
                   "tokenizer.json; 'none' for token-id files (default bpe-8192)")
    p.add_argument("--layers", type=int, default=6, help="decoder layers (default 6)")
    p.add_argument("--intermediate", type=int, help="MLP width (default 8/3 x hidden, rounded up to 64)")
    p.add_argument("--vocab-size", type=int, help="vocabulary (default: the tokenizer's)")
    p.add_argument("--untie-embeddings", action="store_true", help="separate lm_head and embedding")
    p.add_argument("--out", required=True, help="output model directory")
    _add_loop_args(p, steps=1000, lr=1e-3, seq_len=256, batch_size=16)
    p.set_defaults(func=_run_train)


def _run_train(args) -> int:
    from kvslim.train import train_lm

    if args.heads is None and args.hidden is None and not args.hf_config:
        args.heads = 8  # small-model defaults: 8 heads x 64 = width 512
    if args.head_dim is None and not args.hf_config:
        args.head_dim = 64
    specs = specs_from_args(args)
    if len(specs) != 1:
        raise ValueError(f"train takes one attention spec, got {len(specs)}")
    model, history = train_lm(
        spec=specs[0][0], text=args.text, val_text=None if args.val_text == "none" else args.val_text,
        tokenizer=None if args.tokenizer == "none" else args.tokenizer, out=args.out, num_layers=args.layers,
        intermediate_size=args.intermediate, vocab_size=args.vocab_size,
        tie_word_embeddings=not args.untie_embeddings, resume=not args.no_resume, progress=not args.quiet,
        **_loop_kwargs(args),
    )
    print(f"{model.spec.name}: {sum(p.numel() for p in model.parameters()):,} parameters, "
          f"KV {model.spec.bytes_per_token(2) * model.config.num_layers:,} bytes/token (bf16, all layers)")
    _print_history(history, args.out)
    return 0


def _add_finetune(subparsers) -> None:
    p = subparsers.add_parser(
        "finetune", help="recover a converted model's quality by distillation or LM fine-tuning",
        description="Fine-tune a (converted) model: distillation from the teacher's logits (KL at temperature T, "
        "optionally top-k) or plain LM loss, with the same loop as `kvslim train`.",
    )
    p.add_argument("--model", required=True, help="student model directory (kvslim or Hugging Face format)")
    p.add_argument("--teacher", help="teacher model directory (the original); omit for plain LM loss")
    p.add_argument("--text", default="sotu", help="training data (default sotu = its non-held-out part)")
    p.add_argument("--val-text", default="sotu-eval", help="validation data (default sotu-eval); 'none' = none")
    p.add_argument("--tokenizer", help="tokenizer (default: the student's directory, else the teacher's)")
    p.add_argument("--loss", choices=["distill", "lm"], help="default: distill with --teacher, else lm")
    p.add_argument("--temperature", type=_positive_float, default=1.0, help="distillation temperature (default 1)")
    p.add_argument("--top-k", type=int, help="distil over the teacher's top-k logits only")
    p.add_argument("--lm-weight", type=float, default=0.0, help="mix in the LM loss: (1-w) KL + w CE (default 0)")
    p.add_argument("--attention-only", action="store_true", help="train only attention parameters")
    p.add_argument("--out", required=True, help="output model directory")
    _add_loop_args(p, steps=200, lr=1e-4, seq_len=256, batch_size=8)
    p.set_defaults(func=_run_finetune)


def _run_finetune(args) -> int:
    from kvslim.train import finetune

    _, history = finetune(
        model=args.model, teacher=args.teacher, text=args.text,
        val_text=None if args.val_text == "none" else args.val_text, tokenizer=args.tokenizer, loss=args.loss,
        temperature=args.temperature, top_k=args.top_k, lm_weight=args.lm_weight,
        attention_only=args.attention_only, out=args.out, resume=not args.no_resume, progress=not args.quiet,
        **_loop_kwargs(args),
    )
    if len(history["val"]) > 1:
        a, b = history["val"][0], history["val"][-1]
        print(f"validation ppl {a['ppl']:.3f} -> {b['ppl']:.3f}"
              + (f", KL to teacher {a['kl']:.4f} -> {b['kl']:.4f}" if "kl" in a else ""))
    _print_history(history, args.out)
    return 0


def _add_eval(subparsers) -> None:
    p = subparsers.add_parser("eval", help="evaluate models (perplexity)", description="Evaluate models.")
    sub = p.add_subparsers(dest="eval_command", metavar="WHAT", required=True)
    q = sub.add_parser(
        "ppl", help="perplexity on held-out text",
        description="Perplexity of a kvslim or Hugging Face model directory on held-out text "
        "(non-overlapping windows unless --stride).",
    )
    q.add_argument("--model", required=True, action="append", help="model directory (repeatable)")
    q.add_argument("--text", action="append", help="sotu-eval, moby-dick, shakespeare (bare name = held-out part), "
                   "a text file or .npy/.bin ids; repeatable (default sotu-eval)")
    q.add_argument("--tokenizer", help="tokenizer (default: the model directory's)")
    q.add_argument("--seq-len", type=int, default=512, help="window length (default 512)")
    q.add_argument("--stride", type=int, help="sliding-window stride (default: seq-len, no overlap)")
    q.add_argument("--max-tokens", type=int, help="use only the first N tokens of each text")
    q.add_argument("--batch-size", type=int, default=4, help="windows per forward (default 4)")
    q.add_argument("--device", default="auto", help="auto, cpu, cuda (default auto)")
    q.add_argument("--dtype", choices=["auto", "bf16", "fp16", "fp32"], default="auto",
                   help="autocast dtype (auto: bf16 on CUDA, fp32 on CPU)")
    q.add_argument("--json", metavar="PATH", help="also write the rows as JSON")
    q.set_defaults(func=_run_eval_ppl)


def _run_eval_ppl(args) -> int:
    import json

    from kvslim.train import eval_ppl

    texts = args.text or ["sotu-eval"]
    rows = []
    for m in args.model:
        for r in eval_ppl(model=m, texts=texts, tokenizer=args.tokenizer, seq_len=args.seq_len,
                          batch_size=args.batch_size, max_tokens=args.max_tokens, stride=args.stride,
                          device=args.device, dtype=args.dtype, progress=sys.stderr.isatty()):
            rows.append({"model": m, **r})
    w = max(len("model"), *(len(r["model"]) for r in rows))
    t = max(len("text"), *(len(str(r["text"])) for r in rows))
    print(f"{'model':<{w}}  {'text':<{t}}  {'tokens':>9}  {'nll':>7}  {'ppl':>10}")
    for r in rows:
        print(f"{r['model']:<{w}}  {r['text']!s:<{t}}  {r['tokens']:>9,}  {r['nll']:>7.4f}  {r['ppl']:>10.3f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


# ---------------------------------------------------------------------- convert
def _add_convert(subparsers) -> None:
    p = subparsers.add_parser(
        "convert",
        help="convert a checkpoint to a smaller KV cache: MHA->GQA, GQA->MLA (TransMLA), GLA, GTA",
        description="Convert an MHA/GQA checkpoint (HF Llama/Mistral/Qwen2 or kvslim) to GQA (mean-pooled KV "
        "heads), MLA (RoRoPE + FreqFold + BKV-PCA, DeepSeek-V3 format), GLA or GTA (kvslim format), calibrated "
        "on real text; prints KV bytes/token before and after. See docs/convert.md.",
    )
    p.add_argument("--model", required=True, metavar="DIR", help="source checkpoint directory")
    p.add_argument("--to", required=True, choices=["gqa", "mla", "gla", "gta"], help="target attention")
    p.add_argument("--out", required=True, metavar="DIR", help="output directory (written atomically)")
    p.add_argument("--format", choices=["deepseek", "hf", "kvslim"],
                   help="output format (default: deepseek for mla, kvslim otherwise; hf = Llama, gqa only)")
    p.add_argument("--force", action="store_true", help="replace an existing output directory")
    p.add_argument("--kv-heads", type=int, help="gqa: KV heads after mean-pooling (divides the source's)")
    p.add_argument("--kv-lora-rank", "--latent-dim", dest="kv_lora_rank", type=int,
                   help="mla/gla: latent dim d_c (per latent head for gla)")
    p.add_argument("--latent-heads", type=int, help="gla: latent heads h_c (divides the source's KV heads)")
    p.add_argument("--rope-dim", type=int, default=64, help="mla/gla: shared RoPE key dim d_R (default 64)")
    p.add_argument("--freqfold", type=int,
                   help="mla/gla: adjacent RoPE frequencies per PCA (default: source rotary dims / d_R, e.g. 1)")
    p.add_argument("--method", choices=["transmla", "mha2mla"], default="transmla",
                   help="transmla: RoRoPE + BKV-PCA (default); mha2mla: norm-selected partial RoPE + weight SVD")
    p.add_argument("--calib-samples", type=int, default=32, help="calibration windows (default 32)")
    p.add_argument("--calib-seq-len", type=int, default=256, help="tokens per calibration window (default 256)")
    p.add_argument("--calib-text", default="sotu",
                   help="calibration corpus (its calib split) or a text file (default sotu)")
    p.add_argument("--seed", type=int, default=0, help="calibration sampling seed")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32",
                   help="output weight dtype (default float32)")
    p.set_defaults(func=_run_convert)


def _run_convert(args) -> int:
    from kvslim.convert import convert_checkpoint, kv_table

    res = convert_checkpoint(
        model_dir=args.model, out=args.out, to=args.to, fmt=args.format, force=args.force,
        kv_heads=args.kv_heads, latent_heads=args.latent_heads, kv_lora_rank=args.kv_lora_rank,
        rope_dim=args.rope_dim, freqfold=args.freqfold, method=args.method, calib_samples=args.calib_samples,
        calib_seq_len=args.calib_seq_len, calib_text=args.calib_text, seed=args.seed, dtype=args.dtype,
    )
    print(kv_table(res.source, res.target, res.num_layers))
    print(f"\nwrote {res.out} ({res.seconds:.1f} s)")
    return 0


# ------------------------------------------------------- generate / serve / bench
def _add_generate(subparsers) -> None:
    from kvslim.engine.commands import add_generate_args, run_generate

    p = subparsers.add_parser("generate", help="generate from a prompt, streaming text to stdout",
                              description="Generate with the paged-KV engine (--tp N for tensor parallel).")
    add_generate_args(p)
    p.set_defaults(func=run_generate)


def _add_serve(subparsers) -> None:
    from kvslim.engine.commands import add_serve_args, run_serve

    p = subparsers.add_parser("serve", help="OpenAI-compatible HTTP server (completions, chat, SSE, metrics)",
                              description="Serve a model over HTTP with continuous batching; --tp N, --dp M.")
    add_serve_args(p)
    p.set_defaults(func=run_serve)


def _add_bench(subparsers) -> None:
    from kvslim.engine.commands import add_bench_serve_args, run_bench_serve

    p = subparsers.add_parser("bench", help="benchmarks: 'bench serve' loads a server (TTFT, ITL, E2E, tok/s)")
    sub = p.add_subparsers(dest="bench_command", metavar="BENCH", required=True)
    s = sub.add_parser("serve", help="load generator against a server (or one started in-process)")
    add_bench_serve_args(s)
    s.set_defaults(func=run_bench_serve)


# ------------------------------------------------------------------------ main
_COMMANDS = [_add_plan, _add_train, _add_finetune, _add_eval, _add_convert, _add_generate, _add_serve,
             _add_bench]


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
