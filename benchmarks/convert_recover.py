"""Recovery after conversion, measured on held-out genres: SmolLM2-135M -> MLA / GLA / GTA, then distillation.

    python -m benchmarks.convert_recover bundle --out .ship/recover       # here: tokens + GGUF parts
    python -m benchmarks.convert_recover run --bundle .ship/recover/bundle --parts-dir .ship/recover /tmp/ship \\
        --tokens 20000000 --time-budget 300 --results-dir $OUT           # on the GPU machine
    python -m benchmarks.convert_recover run --windows 2 --tokens 512 ...  # here, from this installation
    python -m benchmarks.convert_recover render                            # .md/.png again from the .json

Issue 16's target: after <= 20M tokens of distillation on one GPU, <= x1.10 perplexity against the
original on held-out genres at 50 % of the KV cache. For each target (``--targets``, rows of
``convert_matrix.py``'s ``mix`` calibration; the default is its best 50 % row, MLA r=128 output-aware):

1. convert with the matrix's calibration (16 x 256 windows of ``mix``, seed 0) and options;
2. perplexity of every genre of the matrix (``--windows`` evenly spaced windows of 512 tokens of each
   eval split, fp32): ``sotu``, ``moby-dick``, ``shakespeare``, ``code`` (in the training mixture, other
   documents) and ``pyref``, ``legal``, ``docs`` (**held out**: in no training or calibration text);
3. distil from the original (KL of the full-vocabulary softmaxes, T=1, ``chunked_distill_loss``) on the
   calib splits of the mixture's four sources only, each source ``--train-text``'s share of every
   batch's rows, until ``--tokens`` or ``--time-budget`` seconds of training, whichever comes first;
   bf16 autocast, AdamW, linear warm-up then cosine over the budget's progress;
4. perplexity again; results in ``<results-dir>/convert_recovery.{json,md,png}``, rewritten after every
   target. The headline is the held-out genres' geometric mean of ppl / original.

The tokens come from ``recover_bundle.py`` (a bundle written here, or collected in memory without
``--bundle``), so the GPU run reads nothing of its own installation. The previous version of this
script (SOTU only, 300 steps) left ``results/convert_recovery_sotu.*``.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import json
import math
import os
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from benchmarks import recover_bundle as rb
from benchmarks.convert_matrix import nll, variants_smollm2
from benchmarks.recover_report import HELD_OUT, STEM, _gmean, plot, render

RESULTS = Path(__file__).resolve().parent / "results"
_MATRIX = {n: (to, kw) for c, n, to, kw in variants_smollm2() if c == "mix"}
#: short name -> (the matrix's row name, convert_model target, options): the matrix's ``mix`` rows
TARGETS = {k: (n, *_MATRIX[n]) for k, n in (("mla-r128-oa", "MLA r=128 output-aware"),
                                              # FreqFold 2: what --freqfold auto picks on calibration text
                                              ("mla-r128-ff2-oa", "MLA r=128 freqfold 2 output-aware"),
                                              ("gla3-d64-oa", "GLA-3 d_c=64 output-aware"),
                                              ("gta3-oa", "GTA-3 output-aware"))}


@dataclass(frozen=True)
class Budget:
    """Training stops at whichever comes first: ``tokens`` trained on, or ``seconds`` of training."""

    tokens: int
    seconds: float

    def progress(self, tokens: int, elapsed: float) -> float:
        """Fraction of the budget spent (drives the cosine schedule)."""
        return min(1.0, max(tokens / self.tokens, elapsed / self.seconds))

    def stop(self, tokens: int, step_tokens: int, elapsed: float) -> str | None:
        """``"tokens"`` if one more step would pass the token budget, ``"time"`` once the time is spent, else None."""
        if tokens + step_tokens > self.tokens:
            return "tokens"
        if elapsed >= self.seconds:
            return "time"
        return None


def lr_at(step: int, progress: float, *, lr: float, min_lr: float, warmup_steps: int) -> float:
    """Linear warm-up over ``warmup_steps`` steps times a cosine from ``lr`` to ``min_lr`` over the budget's progress.

    The cosine follows the budget (tokens or time, whichever binds) rather than a step count fixed in
    advance, so the rate has decayed when training stops either way."""
    warm = min(1.0, (step + 1) / warmup_steps) if warmup_steps > 0 else 1.0
    return warm * (min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * min(1.0, progress))))


def mixture_batch(streams: list[torch.Tensor], weights: list[float], batch: int, seq_len: int, step: int,
                  seed: int = 0) -> torch.Tensor:
    """``[batch, seq_len]`` windows, each source ``batch * weight`` rows in expectation (the integer part
    always, the remainder rows drawn by their fractions), starts uniform within the source; seeded by
    ``(seed, step)`` alone."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + step)
    exact = torch.tensor(weights, dtype=torch.float64) / sum(weights) * batch
    counts = exact.floor().long()
    rest = batch - int(counts.sum())
    if rest:
        counts[torch.multinomial(exact - counts, rest, replacement=False, generator=g)] += 1
    rows = []
    for ids, n in zip(streams, counts.tolist()):
        if n == 0:
            continue
        if ids.numel() < seq_len:
            raise ValueError(f"a training stream of {ids.numel()} tokens is shorter than seq_len={seq_len}")
        starts = torch.randint(0, ids.numel() - seq_len + 1, (n,), generator=g)
        rows.append(ids[starts[:, None] + torch.arange(seq_len)])
    return torch.cat(rows)


def distil(student, teacher, data: dict, *, budget: Budget, batch_size: int, seq_len: int, lr: float,
           micro_batch: int | None = None, min_lr: float | None = None, warmup_steps: int = 30,
           weight_decay: float = 0.0, grad_clip: float = 1.0, attention_only: bool = True, loss_chunk: int = 4096,
           compile: bool = False, device: str | torch.device = "cpu", seed: int = 0, log_every: int = 10,
           progress: bool = True) -> dict:
    """Train ``student`` in place to match ``teacher`` on ``data["train"]`` until the budget is spent.

    An out-of-memory error in the first step halves the micro-batch and runs that step again.
    Returns ``{steps, tokens, seconds, tok_per_s, first_step_s, tok_per_s_after_first, micro_batch, stopped_by,
    params, history}`` (``history``: mean KL of the steps since the last record, lr, tokens, elapsed seconds).
    """
    from kvslim.runtime import autocast
    from kvslim.train import chunked_distill_loss

    dev = torch.device(device)
    micro = micro_batch or batch_size
    if batch_size % micro:
        raise ValueError(f"--micro-batch {micro} must divide --batch-size {batch_size}")
    step_tokens = batch_size * seq_len
    if step_tokens > budget.tokens:
        raise ValueError(f"--tokens {budget.tokens} is less than one step ({batch_size} x {seq_len} = {step_tokens})")
    student.to(dev).train()
    teacher.to(dev).eval().requires_grad_(False)
    for name, p in student.named_parameters():
        p.requires_grad_(not attention_only or ".self_attn." in name)
    params = [p for p in student.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    opt = torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), **({"fused": True} if dev.type == "cuda" else {}))
    s_fwd, t_fwd = (torch.compile(student), torch.compile(teacher)) if compile else (student, teacher)
    streams, weights = list(data["train"].values()), list(data["train_weights"].values())
    min_lr = lr / 10 if min_lr is None else min_lr
    hist, tokens, step, reason = [], 0, 0, None
    loss_acc, mark = torch.zeros((), device=dev), (0, 0.0)
    t0 = time.perf_counter()
    while (reason := budget.stop(tokens, step_tokens, time.perf_counter() - t0)) is None:
        rate = lr_at(step, budget.progress(tokens, time.perf_counter() - t0), lr=lr, min_lr=min_lr,
                     warmup_steps=warmup_steps)
        for g in opt.param_groups:
            g["lr"] = rate
        x = mixture_batch(streams, weights, batch_size, seq_len, step, seed)
        if dev.type == "cuda":
            x = x.pin_memory()  # so the copy below does not wait for the GPU
        oom = False
        try:
            for m in range(0, batch_size, micro):
                xb = x[m : m + micro].to(dev, non_blocking=True)
                with autocast(dev):
                    hs = s_fwd(xb, return_hidden=True)
                    with torch.no_grad():
                        ht = t_fwd(xb, return_hidden=True)
                    loss = chunked_distill_loss(hs, ht, student.lm_head, teacher.lm_head, chunk=loss_chunk)
                (loss * (micro / batch_size)).backward()
                loss_acc += loss.detach() * (micro / batch_size)
        except torch.cuda.OutOfMemoryError:
            if step > 0 or micro == 1:
                raise
            oom = True
        if oom:  # (outside the handler, whose traceback held the step's tensors) the first step sizes the
            hs = ht = loss = None  # micro-batch: fewer rows per forward, the same batch and update
            opt.zero_grad(set_to_none=True)
            loss_acc.zero_()
            torch.cuda.empty_cache()
            prev, micro = micro, max(d for d in range(1, micro // 2 + 1) if batch_size % d == 0)
            print(f"  out of memory at {prev} rows per forward: {micro} now", flush=True)
            continue
        if grad_clip:
            torch.nn.utils.clip_grad_norm_(params, grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        step, tokens = step + 1, tokens + step_tokens
        if step == 1:
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            first_s = time.perf_counter() - t0  # includes compilation and autotuning
        if step == 1 or step % log_every == 0:
            now = time.perf_counter() - t0  # float(loss) below waits for the GPU
            kl = float(loss_acc) / (step - mark[0])
            if not math.isfinite(kl):
                raise FloatingPointError(f"distillation loss became {kl} at step {step}; lower --lr")
            hist.append({"step": step, "tokens": tokens, "lr": rate, "kl": kl, "elapsed_s": round(now, 2)})
            if progress:
                print(f"  step {step}: kl {kl:.4f}, lr {rate:.2e}, {tokens:,} tokens, "
                      f"{(tokens - mark[0] * step_tokens) / max(now - mark[1], 1e-9):,.0f} tok/s", flush=True)
            loss_acc.zero_()
            mark = (step, now)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    seconds = time.perf_counter() - t0
    if step > mark[0]:
        hist.append({"step": step, "tokens": tokens, "lr": rate, "kl": float(loss_acc) / (step - mark[0]),
                     "elapsed_s": round(seconds, 2)})
    student.eval()
    return {"steps": step, "tokens": tokens, "seconds": round(seconds, 2), "tok_per_s": round(tokens / seconds),
            "first_step_s": round(first_s, 2),
            "tok_per_s_after_first": round((tokens - step_tokens) / (seconds - first_s)) if step > 1 else None,
            "micro_batch": micro, "stopped_by": reason, "params": sum(p.numel() for p in params), "history": hist}


def genre_ppl(model, evals: dict, *, batch_size: int = 8) -> dict:
    """Perplexity of every genre's windows (fp32, ``convert_matrix.nll``)."""
    model.eval()
    return {g: math.exp(nll(model, x, batch_size=batch_size)) for g, x in evals.items()}


def generations(model, prompts: list[list[int]], tokens: int, decode) -> list[str] | str:
    """Greedy continuations (decoded when a tokenizer came with the data), or the error as text: a failure of
    this side measurement must not lose the run's perplexities."""
    if tokens <= 0:
        return []
    model.set_attention_options(impl="torch")  # the cached path's torch reference: no Triton compilation
    try:
        outs = model.generate(prompts, max_new_tokens=tokens)
    except Exception as e:  # noqa: BLE001 - recorded in the report instead
        return f"generation failed: {type(e).__name__}: {e}"
    return [decode(o) if decode else o for o in outs]


def _subset(x: torch.Tensor, n: int) -> torch.Tensor:
    """``n`` evenly spaced rows of ``x`` (all when ``n`` is 0 or at least its rows)."""
    if not n or n >= x.shape[0]:
        return x
    return x[torch.linspace(0, x.shape[0] - 1, n).round().long()]


def load_inputs(args) -> tuple[dict, object, str]:
    """(data, teacher on CPU, where the model came from); fails on missing GGUF parts before any slow work."""
    parts = joined = None
    if args.bundle:
        data = rb.read_bundle(args.bundle)
        if args.model is None:
            if "gguf" not in data["meta"]:
                raise SystemExit(f"{args.bundle} holds no GGUF parts; pass --model DIR")
            gguf = data["meta"]["gguf"]
            dirs = args.parts_dir or [Path(args.bundle).parent]
            joined = Path(args.gguf_out or Path(dirs[0]) / gguf["name"])
            if not (joined.is_file() and rb.file_sha256(joined) == gguf["sha256"]):  # (joined by an earlier call)
                parts = rb.find_parts(gguf, dirs)
    else:
        from kvslim.eval import smollm2_dir

        data = rb.collect(smollm2_dir(), windows=args.windows or 32)
    from kvslim.model import Transformer

    if args.model is not None:
        return data, Transformer.from_pretrained(args.model), f"directory {args.model}"
    if joined is not None:
        gguf = data["meta"]["gguf"]
        if parts is not None:
            rb.join_parts(gguf, parts, joined)
        rb.use_bundled_gguf(args.bundle)
        from kvslim.eval.smollm2 import transformer_from_gguf

        return data, transformer_from_gguf(joined), f"GGUF {gguf['name']} (sha256 {gguf['sha256'][:16]}), from parts"
    from kvslim.eval import smollm2_dir

    return data, Transformer.from_pretrained(smollm2_dir()), f"directory {smollm2_dir()}"


def run(args) -> dict:
    from kvslim.convert import attention_input_moments, convert_model
    from kvslim.runtime import resolve_device

    t_start = time.perf_counter()
    names = [t for t in args.targets.split(",") if t]
    unknown = [t for t in names if t not in TARGETS]
    if unknown:
        raise SystemExit(f"unknown targets {unknown}; choose from {sorted(TARGETS)}")
    dev = resolve_device(args.device)
    torch.manual_seed(args.seed)
    t0 = time.perf_counter()
    data, teacher, source = load_inputs(args)
    load_s = time.perf_counter() - t0
    evals = {g: _subset(x, args.windows) for g, x in data["eval"].items()}
    calib = _subset(data["calib"], args.calib_samples)
    decode = None
    tok_file = Path(args.bundle or "", "tokenizer.json")
    if args.bundle and tok_file.is_file():
        from tokenizers import Tokenizer

        decode = Tokenizer.from_file(os.fspath(tok_file)).decode
    elif not args.bundle:
        from kvslim.eval import load_tokenizer, smollm2_dir

        decode = load_tokenizer(smollm2_dir()).decode
    teacher_dev = copy.deepcopy(teacher).to(dev) if dev.type != "cpu" else teacher
    t0 = time.perf_counter()
    base = genre_ppl(teacher_dev, evals, batch_size=args.eval_batch)
    eval_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    moments = attention_input_moments(teacher_dev, calib, progress=False)
    moments_s = time.perf_counter() - t0
    L = teacher.config.num_layers
    meta = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"cpu ({platform.machine()})",
        "torch": torch.__version__, "python": platform.python_version(), "torch_threads": torch.get_num_threads(),
        "command": " ".join(["python -m benchmarks.convert_recover", *(sys.argv[1:] if args.argv is None
                                                                       else args.argv)]),
        "model": source, "layers": L, "elements_original": teacher.spec.row_dim,
        "budget": {"tokens": args.tokens, "seconds_per_target": args.time_budget, "deadline_s": args.deadline},
        "train": {"batch_size": args.batch_size, "micro_batch": args.micro_batch or args.batch_size,
                  "seq_len": args.seq_len, "lr": args.lr, "min_lr": args.lr * args.min_lr_ratio,
                  "warmup_steps": args.warmup_steps, "weight_decay": args.weight_decay, "grad_clip": args.grad_clip,
                  "params": args.train, "loss": "KL(teacher || student), full vocabulary, T=1",
                  "loss_chunk": args.loss_chunk, "compile": args.compile, "seed": args.seed,
                  "autocast": "bf16" if dev.type == "cuda" else "none (fp32)"},
        "eval": f"{next(iter(evals.values())).shape[0]} windows x {next(iter(evals.values())).shape[1]} tokens per "
                "genre, evenly spaced over its eval split, fp32",
        "calibration": f"{calib.shape[0]} x {calib.shape[1]} windows of {data['meta']['calib']}",
        "data": {k: data["meta"][k] for k in ("train_text", "train_weights", "texts", "overlap", "overlap_by_source",
                                              "overlap_ngram", "created", "local_genres", "gguf") if k in data["meta"]},
        "train_tokens": {s: x.numel() for s, x in data["train"].items()},
        "seconds": {"load": round(load_s, 1), "eval_original": round(eval_s, 1), "moments": round(moments_s, 1)},
    }
    out = {"meta": meta, "original": {"ppl": base, "elements": teacher.spec.row_dim,
                                      "generations": generations(teacher_dev, data["prompts"], args.gen_tokens, decode)},
           "rows": [], "skipped": []}
    print(f"loaded in {load_s:.1f} s; original ppl " + ", ".join(f"{g} {p:.2f}" for g, p in base.items()), flush=True)
    save(out, args)
    for name in names:
        label, to, kw = TARGETS[name]
        left = (args.deadline - (time.perf_counter() - t_start)) if args.deadline else float("inf")
        if left < 4 * eval_s + 30:
            out["skipped"].append({"target": name, "why": f"{left:.0f} s left of the --deadline"})
            save(out, args)
            continue
        t0 = time.perf_counter()
        conv, _ = convert_model(teacher, to, moments=moments, progress=False, **kw)
        convert_s = time.perf_counter() - t0
        student = conv.to(dev)
        before = genre_ppl(student, evals, batch_size=args.eval_batch)
        gen_before = generations(student, data["prompts"], args.gen_tokens, decode)
        left = (args.deadline - (time.perf_counter() - t_start)) if args.deadline else float("inf")
        seconds = min(args.time_budget, left - 2 * eval_s - 20)
        print(f"{name}: converted in {convert_s:.1f} s; held-out gmean x"
              f"{_gmean(before[g] / base[g] for g in HELD_OUT if g in base):.2f}; training <= {seconds:.0f} s", flush=True)
        train = distil(student, teacher_dev, data, budget=Budget(args.tokens, max(seconds, 1e-3)),
                       batch_size=args.batch_size, micro_batch=args.micro_batch, seq_len=args.seq_len, lr=args.lr,
                       min_lr=args.lr * args.min_lr_ratio, warmup_steps=args.warmup_steps,
                       weight_decay=args.weight_decay, grad_clip=args.grad_clip,
                       attention_only=args.train == "attention", loss_chunk=args.loss_chunk, compile=args.compile,
                       device=dev, seed=args.seed, log_every=args.log_every)
        after = genre_ppl(student, evals, batch_size=args.eval_batch)
        elements = conv.config.kv_elements_per_token() / L
        out["rows"].append({
            "target": name, "label": label, "kind": conv.spec.name, "options": {"to": to, **kw},
            "elements": int(elements) if elements == int(elements) else elements,
            "cache_fraction": elements / teacher.spec.row_dim, "convert_seconds": round(convert_s, 1),
            "ppl_before": before, "ppl_after": after, "train": train,
            "generations_before": gen_before,
            "generations_after": generations(student, data["prompts"], args.gen_tokens, decode)})
        print(f"{name}: {train['tokens']:,} tokens in {train['seconds']:.0f} s ({train['tok_per_s']:,} tok/s, stopped "
              f"by {train['stopped_by']}); held-out gmean x{_gmean(after[g] / base[g] for g in HELD_OUT if g in base):.3f}",
              flush=True)
        save(out, args)
        del student, conv
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    meta["seconds"]["total"] = round(time.perf_counter() - t_start, 1)
    save(out, args)
    return out


def save(out: dict, args) -> None:
    """``<stem>.json`` and ``.md`` (and ``.png`` where matplotlib is installed) into the results directory."""
    d = Path(args.results_dir)
    d.mkdir(parents=True, exist_ok=True)
    (d / f"{args.stem}.json").write_text(json.dumps(out, indent=1))
    (d / f"{args.stem}.md").write_text(render(out, args.stem))
    with contextlib.suppress(ImportError):  # (no matplotlib: no plot)
        plot(out, d / f"{args.stem}.png")


def bundle(args) -> None:
    from kvslim.eval.smollm2 import gguf_path, smollm2_dir

    t0 = time.perf_counter()
    src = smollm2_dir()
    data = rb.collect(src, train_text=args.train_text, calib=args.calib, windows=args.windows, seq_len=args.seq_len,
                      calib_samples=args.calib_samples, calib_seq_len=args.calib_seq_len)
    meta = rb.write_bundle(args.out, data, tokenizer_dir=src, gguf=None if args.no_gguf else gguf_path(),
                           part1_bytes=int(args.part1_mib * 2**20))
    sizes = {p.relative_to(args.out).as_posix(): p.stat().st_size for p in sorted(Path(args.out).rglob("*")) if p.is_file()}
    b = sum(v for k, v in sizes.items() if k.startswith(rb.BUNDLE + "/"))
    print(f"wrote {args.out} in {time.perf_counter() - t0:.0f} s: bundle/ {b / 2**20:.1f} MiB"
          + "".join(f", {k} {v / 2**20:.1f} MiB" for k, v in sizes.items() if not k.startswith(rb.BUNDLE + "/")))
    print("train tokens: " + ", ".join(f"{s} {x.numel():,}" for s, x in data["train"].items()))
    print("eval 32-gram overlap with training: " + ", ".join(f"{g} {v:.4%}" for g, v in meta["overlap"].items()))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("bundle", help="tokenize the data and split the GGUF (here, with this installation)")
    b.add_argument("--out", default=".ship/recover", help="directory: bundle/ + gguf.part1 + gguf.part2")
    b.add_argument("--train-text", default="mix", help="training sources, --calib grammar (calib splits)")
    b.add_argument("--calib", default="mix", help="the conversion's calibration spec")
    b.add_argument("--windows", type=int, default=32, help="eval windows per genre")
    b.add_argument("--seq-len", type=int, default=512, help="eval window length")
    b.add_argument("--calib-samples", type=int, default=16)
    b.add_argument("--calib-seq-len", type=int, default=256)
    b.add_argument("--part1-mib", type=float, default=rb.PART1_BYTES / 2**20, help="size of gguf.part1 (the rest: part2)")
    b.add_argument("--no-gguf", action="store_true", help="tokens only")
    r = sub.add_parser("run", help="convert, measure, distil, measure (reads a bundle, or this installation)")
    r.add_argument("--bundle", help="a bundle/ directory written by `bundle` (default: collect from this installation)")
    r.add_argument("--parts-dir", nargs="+", help="directories to find gguf.part1/part2 in, first match wins "
                   "(default: the bundle's parent)")
    r.add_argument("--gguf-out", help="where the joined GGUF goes (default: in the first --parts-dir); a file "
                   "already there with the bundle's sha256 is used without the parts")
    r.add_argument("--model", help="a model directory instead of the GGUF (tests, local runs)")
    r.add_argument("--targets", default="mla-r128-oa", help=f"comma-separated, from {sorted(TARGETS)}")
    r.add_argument("--tokens", type=int, default=20_000_000, help="training token budget per target")
    r.add_argument("--time-budget", type=float, default=300.0, help="training seconds per target (first of the two wins)")
    r.add_argument("--deadline", type=float, default=0.0, help="whole run's wall seconds: training is cut to fit and "
                   "targets that no longer fit are skipped (0 = none)")
    r.add_argument("--batch-size", type=int, default=64)
    r.add_argument("--micro-batch", type=int, default=0, help="rows per forward (0 = the batch)")
    r.add_argument("--seq-len", type=int, default=512)
    r.add_argument("--lr", type=float, default=2e-4)
    r.add_argument("--min-lr-ratio", type=float, default=0.1)
    r.add_argument("--warmup-steps", type=int, default=30)
    r.add_argument("--weight-decay", type=float, default=0.0)
    r.add_argument("--grad-clip", type=float, default=1.0)
    r.add_argument("--train", choices=["attention", "all"], default="attention",
                   help="parameters trained: the converted attention only, or every parameter")
    r.add_argument("--loss-chunk", type=int, default=4096, help="positions per block of the distillation loss")
    r.add_argument("--compile", action="store_true", help="torch.compile student and teacher")
    r.add_argument("--windows", type=int, default=0, help="eval windows per genre (0 = all in the bundle)")
    r.add_argument("--calib-samples", type=int, default=0, help="calibration windows (0 = all in the bundle)")
    r.add_argument("--eval-batch", type=int, default=8)
    r.add_argument("--gen-tokens", type=int, default=16)
    r.add_argument("--device", default="auto")
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--log-every", type=int, default=10)
    for sp in (r, sub.add_parser("render", help="<stem>.md and .png again from <stem>.json")):
        sp.add_argument("--results-dir", default=os.fspath(RESULTS))
        sp.add_argument("--stem", default=STEM)
    args = p.parse_args(argv)
    args.argv = argv
    if args.cmd == "bundle":
        bundle(args)
    elif args.cmd == "run":
        run(args)
    else:
        out = json.loads((Path(args.results_dir) / f"{args.stem}.json").read_text())
        save(out, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
