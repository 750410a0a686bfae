"""The quality study's measurements: one training run (``worker``) and the decode timings.

``worker`` trains one (variant, seed) and writes its curves and final perplexities as JSON
(the driver runs many at once, each in its own process); ``decode_bench`` times a trained
model's decode step eagerly and ``generate`` at batch 1; ``graph_decode`` (the ``decode``
subcommand) times random-init models of the study's shapes eagerly and as one CUDA graph.
"""

from __future__ import annotations

import datetime
import json
import os
import statistics
import time
from pathlib import Path

from benchmarks.quality_setup import DATA, EVAL_SETS, SHAPE, matched_configs, spec_for


def worker(a) -> None:
    """Train one (variant, seed) run from ``a`` (the ``worker`` flags) and write its JSON to ``a.out``."""
    import torch

    from kvslim.eval.perplexity import model_perplexity
    from kvslim.eval.tokens import load_tokens
    from kvslim.train import TrainConfig, build_model, train

    torch.backends.cuda.matmul.allow_tf32 = True
    spec = spec_for(a.variant)
    model = build_model(
        spec,
        vocab_size=SHAPE["vocab"],
        num_layers=SHAPE["layers"],
        intermediate_size=a.ff,
        max_position_embeddings=SHAPE["max_pos"],
        seed=a.seed,
    )
    train_ids = load_tokens(DATA / "train.npy")
    val = load_tokens(DATA / EVAL_SETS["sotu"])
    steps = a.steps
    cfg = TrainConfig(
        steps=steps,
        batch_size=a.batch_size,
        seq_len=a.seq_len,
        lr=a.lr,
        warmup_steps=max(1, steps // 20),
        eval_every=0 if a.probe else max(1, steps // 10),
        eval_tokens=32768,
        log_every=5 if a.probe else 10,
        seed=a.seed,
        device=a.device,
    )
    t0 = time.perf_counter()
    hist = train(model, train_ids, config=cfg, val_tokens=None if a.probe else val, progress=False)
    if a.device.startswith("cuda"):
        torch.cuda.synchronize()
    train_s = time.perf_counter() - t0
    res = {
        "variant": a.variant,
        "seed": a.seed,
        "ff": a.ff,
        "params": sum(p.numel() for p in model.parameters()),
        "steps": steps,
        "tokens": steps * cfg.tokens_per_step,
        "train_s": train_s,
        "config": cfg.to_dict(),
        "train": hist["train"],
        "val": hist["val"],
    }
    if a.probe:
        rates = [r["tok_per_s"] for r in hist["train"] if r["step"] > 10]
        res["tok_per_s"] = statistics.median(rates) if rates else hist["train"][-1]["tok_per_s"]
    else:
        res["tok_per_s"] = res["tokens"] / train_s
        res["final"] = {}
        for name, f in EVAL_SETS.items():
            ids = load_tokens(DATA / f)
            res["final"][name] = model_perplexity(
                model, ids, seq_len=a.seq_len, batch_size=16, device=a.device, max_tokens=a.eval_max_tokens
            )
        if a.save:
            model.save_pretrained(a.save)
    Path(a.out).write_text(json.dumps(res))
    print(
        f"{a.variant} seed {a.seed}: done in {train_s:.1f} s, {res['tok_per_s']:,.0f} tok/s"
        + (f", sotu ppl {res['final']['sotu']['ppl']:.3f}" if "final" in res else ""),
        flush=True,
    )


def decode_bench(
    model_dir: str, *, batch: int, contexts: list[int], device: str, steps: int = 20, impl: str = "auto"
) -> dict:
    """A trained model's decode speed: ``generate`` tok/s at batch 1, one decode step per context (µs)."""
    import torch

    from kvslim.eval.tokens import load_tokens
    from kvslim.model import Transformer

    dev = torch.device(device)
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    model = Transformer.from_pretrained(model_dir, dtype=dtype, device=dev).eval()
    model.set_attention_options(impl=impl)
    spec = model.spec
    kernel = impl if impl != "auto" else ("triton" if dev.type == "cuda" else "torch")
    out = {"variant": spec.name, "batch": batch, "impl": impl, "kernel": kernel}

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize()

    # generate at batch 1 (Python + launch bound for a model this small)
    prompt = load_tokens(DATA / EVAL_SETS["sotu"])[:128].tolist()
    model.generate([prompt], 8)
    sync()
    t = time.perf_counter()
    n_new = 128 if dev.type == "cuda" else 8
    gen = model.generate([prompt], n_new)[0]
    sync()
    out["generate_tok_s_b1"] = len(gen) / (time.perf_counter() - t)
    try:
        from kvslim.eval.tokenizer import resolve_tokenizer

        tok = resolve_tokenizer(os.fspath(DATA / "tokenizer"))
        out["sample"] = tok.decode(prompt[-24:]) + " ||| " + tok.decode(gen[:48])
    except Exception as e:  # the sample text is a nicety only
        out["sample"] = f"(no tokenizer: {e})"
    # one decode step of the whole model over a filled cache
    out["step_us"] = {}
    g = torch.Generator(device=dev).manual_seed(0)
    for ctx in contexts:
        cache = model.new_cache(batch, ctx + steps + 8, page_size=64)
        for p in cache.pools:
            p.normal_(0, 1, generator=g)
        cache.seq_lens.fill_(ctx)
        tok = torch.randint(0, SHAPE["vocab"], (batch, 1), device=dev, generator=g)
        with torch.no_grad():
            for _ in range(3):
                model(tok, cache)
            sync()
            times = []
            for _ in range(steps):
                if dev.type == "cuda":
                    e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    e0.record()
                    model(tok, cache)
                    e1.record()
                    e1.synchronize()
                    times.append(e0.elapsed_time(e1) * 1e3)
                else:
                    t = time.perf_counter()
                    model(tok, cache)
                    times.append((time.perf_counter() - t) * 1e6)
        out["step_us"][str(ctx)] = statistics.median(times)
        out.setdefault("kv_gb", {})[str(ctx)] = spec.bytes_per_token(2) * SHAPE["layers"] * batch * ctx / 1e9
        del cache
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    return out


def graph_decode(a) -> None:
    """Decode-step time of each variant (random init, the study's shapes): eager vs one CUDA graph.

    A 30M-parameter model's eager decode step is bound by Python and kernel launches, not
    by KV bytes; replaying the whole step as a CUDA graph removes the host side, so the
    time left is the GPU's (KV reads, weights, launches back to back).
    """
    import torch

    from kvslim.train import build_model

    dev = torch.device("cuda")
    out = Path(os.environ.get("OUT") or a.out)
    out.mkdir(parents=True, exist_ok=True)
    cfgs = {c["variant"]: c for c in matched_configs()}
    info = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "gpu": torch.cuda.get_device_name(),
        "torch": torch.__version__,
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    # measured copy bandwidth (read + write bytes), as DESIGN.md asks
    buf = torch.empty(2 * 1024**3 // 2, dtype=torch.bfloat16, device=dev).normal_()
    dst = torch.empty_like(buf)
    for _ in range(3):
        dst.copy_(buf)
    e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    e0.record()
    for _ in range(10):
        dst.copy_(buf)
    e1.record()
    e1.synchronize()
    info["copy_tb_s"] = 2 * buf.numel() * 2 * 10 / (e0.elapsed_time(e1) * 1e-3) / 1e12
    del buf, dst
    rows = []
    g = torch.Generator(device=dev).manual_seed(0)
    for v in a.variants.split(","):
        model = build_model(
            spec_for(v),
            vocab_size=SHAPE["vocab"],
            num_layers=SHAPE["layers"],
            intermediate_size=cfgs[v]["ff"],
            max_position_embeddings=SHAPE["max_pos"],
        )
        model = model.to(dev, torch.bfloat16).eval()
        spec = model.spec
        for ctx in a.contexts:
            row = {
                "variant": spec.name,
                "batch": a.batch,
                "context": ctx,
                "kernel": "triton (impl=auto)",
                "kv_gb": spec.bytes_per_token(2) * SHAPE["layers"] * a.batch * ctx / 1e9,
            }
            try:
                n = a.steps
                cache = model.new_cache(a.batch, ctx + n + 16, page_size=64)
                for p in cache.pools:
                    p.normal_(0, 1, generator=g)
                tok = torch.randint(0, SHAPE["vocab"], (a.batch, 1), device=dev, generator=g)
                with torch.no_grad():
                    cache.seq_lens.fill_(ctx)
                    for _ in range(3):
                        model(tok, cache)
                    torch.cuda.synchronize()
                    cache.seq_lens.fill_(ctx)
                    e0.record()
                    for _ in range(n):
                        model(tok, cache)
                    e1.record()
                    e1.synchronize()
                    row["eager_us"] = e0.elapsed_time(e1) * 1e3 / n
                    side = torch.cuda.Stream()
                    side.wait_stream(torch.cuda.current_stream())
                    with torch.cuda.stream(side):
                        cache.seq_lens.fill_(ctx)
                        for _ in range(3):
                            model(tok, cache)
                    torch.cuda.current_stream().wait_stream(side)
                    cache.seq_lens.fill_(ctx)
                    graph = torch.cuda.CUDAGraph()
                    with torch.cuda.graph(graph):
                        model(tok, cache)
                    times = []
                    for _ in range(5):
                        cache.seq_lens.fill_(ctx)
                        graph.replay()
                        e0.record()
                        for _ in range(n):
                            graph.replay()
                        e1.record()
                        e1.synchronize()
                        times.append(e0.elapsed_time(e1) * 1e3 / n)
                    row["graph_us"] = statistics.median(times)
                    row["graph_spread_us"] = max(times) - min(times)
                    row["kv_tb_s"] = row["kv_gb"] * 1e9 / (row["graph_us"] * 1e-6) / 1e12
                del cache, graph
            except Exception as e:
                row["error"] = repr(e)
            torch.cuda.empty_cache()
            rows.append(row)
            print(json.dumps(row), flush=True)
        del model
    (out / "decode_results.json").write_text(json.dumps({"info": info, "rows": rows}))
    print(json.dumps(info))
