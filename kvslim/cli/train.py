"""``kvslim train`` and ``kvslim finetune``: one training loop (``kvslim.train``), two commands."""

from __future__ import annotations

import argparse

from kvslim.cli.common import add_spec_args, positive_float, specs_from_args


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
    g.add_argument("--force", action="store_true",
                   help="replace an existing model directory at --out (nothing else is ever replaced)")
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


def add_train(subparsers) -> None:
    p = subparsers.add_parser(
        "train", help="train a small model from an attention spec on a text or token corpus",
        description="Train a kvslim Transformer from scratch: AdamW, warm-up + cosine, bf16 autocast on "
        "CUDA, checkpoints with exact resume, loss/ppl curves (CSV + PNG).",
    )
    add_spec_args(p)
    p.add_argument("--text", default="sotu", help="training data: corpus name (sotu, moby-dick, shakespeare; "
                   "bare name = its non-held-out part), a .txt file, .npy/.bin token ids, or a mixture spec such as "
                   "'mix' or 'sotu:1,code:1' (each source's calib split, its weight's share of the tokens; default sotu)")
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
    from kvslim.train import dist

    try:  # under torchrun: one rank of an FSDP run (kvslim.train.dist)
        model, history = train_lm(
            spec=specs[0][0], text=args.text, val_text=None if args.val_text == "none" else args.val_text,
            tokenizer=None if args.tokenizer == "none" else args.tokenizer, out=args.out, num_layers=args.layers,
            intermediate_size=args.intermediate, vocab_size=args.vocab_size,
            tie_word_embeddings=not args.untie_embeddings, resume=not args.no_resume, force=args.force,
            progress=not args.quiet,
            **_loop_kwargs(args),
        )
        if not dist.is_main():
            return 0
    finally:
        dist.shutdown()
    print(f"{model.spec.name}: {sum(p.numel() for p in model.parameters()):,} parameters, "
          f"KV {model.config.kv_elements_per_token() * 2:,} bytes/token (bf16, all layers)")
    _print_history(history, args.out)
    return 0


def add_finetune(subparsers) -> None:
    p = subparsers.add_parser(
        "finetune", help="recover a converted model's quality by distillation or LM fine-tuning",
        description="Fine-tune a (converted) model: distillation from the teacher's logits (KL at temperature T, "
        "optionally top-k) or plain LM loss, with the same loop as `kvslim train`.",
    )
    p.add_argument("--model", required=True, help="student model directory (kvslim or Hugging Face format)")
    p.add_argument("--teacher", help="teacher model directory (the original); omit for plain LM loss")
    p.add_argument("--text", default="sotu", help="training data (default sotu = its non-held-out part); a "
                   "mixture spec such as 'mix' (convert's default calibration) or 'sotu:1,code:1' takes each "
                   "source's calib split in its weight's share of the tokens")
    p.add_argument("--val-text", default="sotu-eval", help="validation data (default sotu-eval); 'none' = none")
    p.add_argument("--tokenizer", help="tokenizer (default: the student's directory, else the teacher's)")
    p.add_argument("--loss", choices=["distill", "lm"], help="default: distill with --teacher, else lm")
    p.add_argument("--temperature", type=positive_float, default=1.0, help="distillation temperature (default 1)")
    p.add_argument("--top-k", type=int, help="distil over the teacher's top-k logits only")
    p.add_argument("--lm-weight", type=float, default=0.0, help="mix in the LM loss: (1-w) KL + w CE (default 0)")
    p.add_argument("--attention-only", action="store_true", help="train only attention parameters")
    p.add_argument("--out", required=True, help="output model directory")
    _add_loop_args(p, steps=200, lr=1e-4, seq_len=256, batch_size=8)
    p.set_defaults(func=_run_finetune)


def _run_finetune(args) -> int:
    from kvslim.eval.models import resolve_model_dir
    from kvslim.train import dist, finetune

    try:  # under torchrun: one rank of an FSDP run (kvslim.train.dist)
        _, history = finetune(
            model=resolve_model_dir(args.model), teacher=resolve_model_dir(args.teacher), text=args.text,
            val_text=None if args.val_text == "none" else args.val_text, tokenizer=args.tokenizer, loss=args.loss,
            temperature=args.temperature, top_k=args.top_k, lm_weight=args.lm_weight,
            attention_only=args.attention_only, out=args.out, resume=not args.no_resume, force=args.force,
            progress=not args.quiet,
            **_loop_kwargs(args),
        )
        if not dist.is_main():
            return 0
    finally:
        dist.shutdown()
    if len(history["val"]) > 1:
        a, b = history["val"][0], history["val"][-1]
        print(f"validation ppl {a['ppl']:.3f} -> {b['ppl']:.3f}"
              + (f", KL to teacher {a['kl']:.4f} -> {b['kl']:.4f}" if "kl" in a else ""))
    _print_history(history, args.out)
    return 0
