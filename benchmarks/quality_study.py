"""Quality study (issue 6): MHA, MQA, GQA-4, GTA-4, MLA, GLA-2 trained from scratch at equal size.

Seed 000 §5.1 (Tab. 5) reports GTA-4 ≈ GQA-4 and GLA-2 ≈ MLA in perplexity at 183M-1.47B
parameters on FineWeb-Edu. This script repeats the comparison at ~30M parameters on the
only English corpus available offline here (SOTU, `kvslim.eval.data`), so it shows whether
the ordering survives at small scale, not that it holds at the paper's.

Protocol (every run identical except the attention variant and the seed):

* width 512, 8 query heads of d_h = 64, 8 layers, SwiGLU MLP, tied embeddings, BPE-8192
  trained on the SOTU training split; presets as in `AttentionSpec.preset` (GQA-4/GTA-4:
  4 KV heads; MLA: d_c = 4 d_h = 256, d_R = 32; GLA-2: 2 latents of 2 d_h = 128, d_R = 32);
* **equal parameter count**: MHA with MLP width 1408 is the reference; every other variant's
  MLP width is the multiple of 16 that brings its total closest (all within 0.2 %);
* same token budget, batch (16 x 512), schedule (AdamW, warm-up 5 %, cosine to lr/10), data
  order and init seed per seed; bf16 autocast; 2 seeds;
* validation: SOTU held-out addresses (2012-2021), moby-dick and shakespeare held-out parts
  (out of domain), non-overlapping 512-token windows;
* decode speed of each trained model (seed 0) on the GPU: one decode step of the whole
  model at batch 64 over a filled cache (`Transformer.forward` with a KV cache, kernels
  dispatched by `kvslim.kernels` with ``impl="auto"``, i.e. the Triton kernels on CUDA),
  and `Transformer.generate` tokens/s at batch 1.

Usage:
    python benchmarks/quality_study.py prepare            # here: tokenizer + .data/quality/*.npy + code snapshot
    python benchmarks/quality_study.py run                # on the GPU: probe, train 12 runs concurrently, decode bench
    python benchmarks/quality_study.py report RESULTS.json  # here: benchmarks/results/quality.{md,png,csv}
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import tarfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / ".data" / "quality"
SNAP = ROOT / ".data" / "snap"
VARIANTS = ["mha", "mqa", "gqa-4", "gta-4", "mla", "gla-2"]
SHAPE = {
    "hidden": 512,
    "heads": 8,
    "head_dim": 64,
    "layers": 8,
    "vocab": 8192,
    "ref_ff": 1408,
    "max_pos": 16384,
}
if os.environ.get("KVSLIM_QS_TINY"):  # smoke-test the pipeline on a CPU in seconds
    SHAPE = {**SHAPE, "hidden": 64, "heads": 4, "head_dim": 16, "layers": 2, "ref_ff": 128, "max_pos": 4096}
EVAL_SETS = {"sotu": "sotu_eval.npy", "moby-dick": "moby_eval.npy", "shakespeare": "shakespeare_eval.npy"}


# ------------------------------------------------------------------ shapes
def spec_for(name: str):
    from kvslim.spec import AttentionSpec

    return AttentionSpec.preset(
        name, num_heads=SHAPE["heads"], head_dim=SHAPE["head_dim"], hidden_size=SHAPE["hidden"]
    )


def count_params(spec, ff: int) -> int:
    import torch

    from kvslim.model import ModelConfig, Transformer

    cfg = ModelConfig(
        vocab_size=SHAPE["vocab"],
        hidden_size=SHAPE["hidden"],
        intermediate_size=ff,
        num_layers=SHAPE["layers"],
        attention=spec,
        tie_word_embeddings=True,
    )
    with torch.device("meta"):
        m = Transformer(cfg)
    return sum(p.numel() for p in m.parameters())


def matched_configs() -> list[dict]:
    """Per variant: MLP width (multiple of 16) matching the MHA reference's total parameters."""
    target = count_params(spec_for("mha"), SHAPE["ref_ff"])
    rows = []
    for name in VARIANTS:
        spec = spec_for(name)
        base = count_params(spec, 16)
        per16 = count_params(spec, 32) - base
        ff = max(16, 16 + round((target - base) / per16) * 16)
        params = count_params(spec, ff)
        rows.append(
            {
                "variant": name,
                "ff": ff,
                "params": params,
                "rel_diff": params / target - 1,
                "kv_elems_layer": spec.row_dim,
                "kv_bytes_token": spec.bytes_per_token(2) * SHAPE["layers"],
            }
        )
    return rows


# ----------------------------------------------------------------- prepare
def snapshot() -> str:
    """Copy the committed kvslim/ into .data/snap (the device runs it; the working tree is shared)."""
    commit = subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True
    ).stdout.strip()
    if SNAP.exists():
        subprocess.run(["rm", "-rf", str(SNAP)], check=True)
    SNAP.mkdir(parents=True)
    arc = subprocess.run(
        ["git", "archive", "HEAD", "kvslim"], cwd=ROOT, capture_output=True, check=True
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(SNAP)], input=arc, check=True)
    if (DATA / "meta.json").is_file():
        meta = json.loads((DATA / "meta.json").read_text())
        meta["commit"] = commit
        (DATA / "meta.json").write_text(json.dumps(meta, indent=1))
    print(f"snapshot of kvslim at {commit} in {SNAP}")
    return commit


def prepare(args) -> None:
    """Tokenizer (BPE-8192 on SOTU calib), token files and a snapshot of the committed code."""
    from kvslim.eval.tokens import load_tokens, save_tokenizer, save_tokens, source_text, train_bpe

    if args.snapshot_only:
        snapshot()
        return

    DATA.mkdir(parents=True, exist_ok=True)
    text = source_text("sotu-train")
    tok = train_bpe(text, SHAPE["vocab"])
    save_tokenizer(tok, DATA / "tokenizer")
    counts = {}
    for name, src in [
        ("train.npy", "sotu-train"),
        ("sotu_eval.npy", "sotu-eval"),
        ("moby_eval.npy", "moby-dick:eval"),
        ("shakespeare_eval.npy", "shakespeare:eval"),
    ]:
        ids = load_tokens(src, tokenizer=tok)
        save_tokens(ids, DATA / name)
        counts[name] = ids.numel()
        print(f"{name}: {ids.numel():,} tokens")
    commit = snapshot()
    meta = {
        "tokenizer": "bpe-8192 trained on sotu:calib",
        "tokens": counts,
        "commit": commit,
        "configs": matched_configs(),
        "shape": SHAPE,
    }
    (DATA / "meta.json").write_text(json.dumps(meta, indent=1))
    for r in meta["configs"]:
        print(
            f"{r['variant']:>6}: ff {r['ff']:5d}  params {r['params']:,} ({r['rel_diff']:+.2%})  "
            f"KV {r['kv_bytes_token']} B/token"
        )


# ------------------------------------------------------------------ worker
def worker(a) -> None:
    import torch

    from kvslim.eval.tokens import load_tokens
    from kvslim.train import TrainConfig, build_model, evaluate, train

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
            res["final"][name] = evaluate(
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


# ------------------------------------------------------------ decode bench
def decode_bench(
    model_dir: str, *, batch: int, contexts: list[int], device: str, steps: int = 20, impl: str = "auto"
) -> dict:
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
        from kvslim.eval.tokens import resolve_tokenizer

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


# ------------------------------------------------------------------ driver
def _launch(jobs, args_of, logdir: Path, env) -> list:
    procs = []
    for job in jobs:
        log = open(logdir / f"{job['name']}.log", "w")  # noqa: SIM115 (closed in _wait)
        procs.append(
            (
                job,
                subprocess.Popen(
                    [sys.executable, __file__, "worker", *args_of(job)],
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    env=env,
                ),
                log,
            )
        )
    return procs


def _wait(procs, deadline: float) -> list[str]:
    failed = []
    for job, p, log in procs:
        try:
            rc = p.wait(timeout=max(1.0, deadline - time.time()))
        except subprocess.TimeoutExpired:
            p.kill()
            rc = "timeout"
        log.close()
        if rc != 0:
            failed.append(f"{job['name']}: {rc}")
            tail = Path(log.name).read_text().splitlines()[-15:]
            print(f"--- {job['name']} failed ({rc}):\n" + "\n".join(tail), flush=True)
    return failed


def run(a) -> None:
    import torch

    t_start = time.time()
    out = Path(os.environ.get("OUT") or a.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(a.work)
    logdir = work / "logs"
    logdir.mkdir(parents=True, exist_ok=True)
    meta = json.loads((DATA / "meta.json").read_text())
    cfgs = {c["variant"]: c for c in matched_configs()}
    variants = a.variants.split(",")
    seeds = list(range(a.seeds))
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    info = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "gpu": torch.cuda.get_device_name() if dev == "cuda" else "cpu",
        "torch": torch.__version__,
        "python": sys.version.split()[0],
        "commit": meta["commit"],
        "device": dev,
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    print(json.dumps(info), flush=True)
    jobs = [
        {"name": f"{v}_s{s}", "variant": v, "seed": s, "ff": cfgs[v]["ff"]} for v in variants for s in seeds
    ]
    common = [
        "--batch-size",
        str(a.batch_size),
        "--seq-len",
        str(a.seq_len),
        "--lr",
        str(a.lr),
        "--device",
        dev,
    ]
    if a.eval_max_tokens:
        common += ["--eval-max-tokens", str(a.eval_max_tokens)]

    def job_args(j: dict, steps: int) -> list[str]:
        """Worker flags of one run (variant, seed, MLP width, steps) plus the flags all runs share."""
        return ["--variant", j["variant"], "--seed", str(j["seed"]), "--ff", str(j["ff"]), "--steps", str(steps),
                *common]

    # 1) throughput probe: all runs at once, as in the real run
    steps = a.steps
    probe = None
    if not steps:
        t = time.time()
        procs = _launch(
            jobs,
            lambda j: [*job_args(j, a.probe_steps), "--probe", "--out", str(work / f"probe_{j['name']}.json")],
            logdir,
            env,
        )
        failed = _wait(procs, time.time() + 240)
        rates = {
            j["name"]: json.loads((work / f"probe_{j['name']}.json").read_text())["tok_per_s"]
            for j in jobs
            if (work / f"probe_{j['name']}.json").is_file()
        }
        if failed or not rates:
            raise SystemExit(f"probe failed: {failed}; see {logdir}")
        slowest = min(rates.values())
        tokens_per_step = a.batch_size * a.seq_len
        steps = int(a.train_seconds * slowest / tokens_per_step) // 50 * 50
        steps = max(50, min(steps, a.max_tokens // tokens_per_step))
        probe = {"seconds": time.time() - t, "tok_per_s": rates, "steps": steps}
        print(
            f"probe ({time.time() - t:.0f} s): slowest {slowest:,.0f} tok/s per run, "
            f"aggregate {sum(rates.values()):,.0f} tok/s -> {steps} steps = {steps * tokens_per_step:,} tokens/run",
            flush=True,
        )

    # 2) the real runs, all concurrently
    t = time.time()
    procs = _launch(
        jobs,
        lambda j: [
            *job_args(j, steps),
            "--out",
            str(work / f"run_{j['name']}.json"),
            *(["--save", str(work / f"model_{j['variant']}")] if j["seed"] == 0 else []),
        ],
        logdir,
        env,
    )
    failed = _wait(procs, t_start + a.deadline)
    runs = [
        json.loads((work / f"run_{j['name']}.json").read_text())
        for j in jobs
        if (work / f"run_{j['name']}.json").is_file()
    ]
    train_wall = time.time() - t
    print(f"training: {len(runs)}/{len(jobs)} runs in {train_wall:.0f} s; failed: {failed}", flush=True)

    # 3) decode speed, one model at a time on the otherwise idle GPU
    decode = []
    for v in variants:
        d = work / f"model_{v}"
        if not d.is_dir() or time.time() - t_start > a.deadline + 60:
            continue
        try:
            decode.append(decode_bench(str(d), batch=a.decode_batch, contexts=a.contexts, device=dev))
            print(
                f"decode {v}: {decode[-1]['step_us']} us/step, generate {decode[-1]['generate_tok_s_b1']:.0f} tok/s",
                flush=True,
            )
        except Exception as e:  # record it, then measure the torch reference path instead
            print(f"decode {v} (impl auto) failed: {e!r}; retrying with impl='torch'", flush=True)
            try:
                decode.append(
                    {
                        **decode_bench(
                            str(d), batch=a.decode_batch, contexts=a.contexts, device=dev, impl="torch"
                        ),
                        "auto_error": repr(e),
                    }
                )
            except Exception as e2:
                decode.append({"variant": v, "error": repr(e2), "auto_error": repr(e)})
    res = {
        "info": info,
        "meta": meta,
        "configs": cfgs,
        "probe": probe,
        "steps": steps,
        "train_wall_s": train_wall,
        "failed": failed,
        "runs": runs,
        "decode": decode,
        "total_s": time.time() - t_start,
        "args": {k: v for k, v in vars(a).items() if not callable(v)},
    }
    (out / "quality_results.json").write_text(json.dumps(res))
    with tarfile.open(out / "logs.tgz", "w:gz") as tar:
        tar.add(logdir, arcname="logs")
    _summary(res)


def _summary(res) -> None:
    by = {}
    for r in res["runs"]:
        by.setdefault(r["variant"], []).append(r["final"]["sotu"]["ppl"])
    for v, ps in by.items():
        print(f"{v:>6}: sotu ppl {statistics.mean(ps):.3f} (seeds: {', '.join(f'{p:.3f}' for p in ps)})")


# ------------------------------------------------------------------ report
def _stats(xs):
    m = statistics.mean(xs)
    return m, (statistics.stdev(xs) if len(xs) > 1 else 0.0), min(xs), max(xs)


def _seed_ppls(res, variant) -> str:
    return ", ".join(f"{p['final']['sotu']['ppl']:.2f}" for p in res["runs"] if p["variant"] == variant)


def report(a) -> None:
    """quality.csv + quality.png from the run's JSON (and the CUDA-graph decode JSON); prints the table."""
    import csv

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    res = json.loads(Path(a.results).read_text())
    info, cfgs = res["info"], res["configs"]
    eager = {d["variant"]: d for d in res["decode"] if "error" not in d}
    graph = json.loads(Path(a.decode).read_text()) if a.decode else {"rows": [], "info": {}}
    gctx = sorted({r["context"] for r in graph["rows"]})
    variants = [v for v in VARIANTS if any(r["variant"] == v for r in res["runs"])]
    rows = []
    for v in variants:
        rs = [r for r in res["runs"] if r["variant"] == v]
        name = spec_for(v).name
        row = {
            "variant": v,
            "seeds": len(rs),
            "params": cfgs[v]["params"],
            "params_rel_mha": cfgs[v]["rel_diff"],
            "ff": cfgs[v]["ff"],
            "kv_elems_layer": cfgs[v]["kv_elems_layer"],
            "kv_bytes_token": cfgs[v]["kv_bytes_token"],
            "tokens": rs[0]["tokens"],
            "steps": rs[0]["steps"],
            "train_tok_s": statistics.mean(r["tok_per_s"] for r in rs),
        }
        for ev in EVAL_SETS:
            m, sd, lo, hi = _stats([r["final"][ev]["ppl"] for r in rs])
            row[f"{ev}_ppl"], row[f"{ev}_sd"], row[f"{ev}_min"], row[f"{ev}_max"] = m, sd, lo, hi
            row[f"{ev}_seeds"] = " ".join(
                f"{r['final'][ev]['ppl']:.2f}" for r in sorted(rs, key=lambda r: r["seed"])
            )
        d = eager.get(name)
        if d:
            for ctx, us in d["step_us"].items():
                row[f"eager_us_{ctx}"] = us
            row["generate_tok_s_b1"] = d["generate_tok_s_b1"]
        for g in graph["rows"]:
            if g["variant"] == name and "graph_us" in g:
                row[f"graph_us_{g['context']}"] = g["graph_us"]
        if len(gctx) >= 2 and all(f"graph_us_{c}" in row for c in gctx[:1] + gctx[-1:]):
            lo_c, hi_c = gctx[0], gctx[-1]
            extra = spec_for(v).bytes_per_token(2) * SHAPE["layers"] * 64 * (hi_c - lo_c)
            row["marginal_kv_tb_s"] = (
                extra / ((row[f"graph_us_{hi_c}"] - row[f"graph_us_{lo_c}"]) * 1e-6) / 1e12
            )
        rows.append(row)

    out = Path(a.outdir)
    out.mkdir(parents=True, exist_ok=True)
    cols = list(dict.fromkeys(k for r in rows for k in r))
    with open(out / "quality.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        w.writerows(rows)

    colors = dict(zip(VARIANTS, plt.rcParams["axes.prop_cycle"].by_key()["color"]))
    fig, axes = plt.subplots(1, 3, figsize=(17, 4.8))
    ax = axes[0]
    for r in rows:
        c = colors[r["variant"]]
        ax.errorbar(
            r["kv_bytes_token"],
            r["sotu_ppl"],
            yerr=[[r["sotu_ppl"] - r["sotu_min"]], [r["sotu_max"] - r["sotu_ppl"]]],
            fmt="o",
            capsize=4,
            color=c,
        )
        for p in r["sotu_seeds"].split():
            ax.plot(r["kv_bytes_token"], float(p), "x", color=c, ms=5)
        ax.annotate(
            r["variant"].upper(),
            (r["kv_bytes_token"], r["sotu_ppl"]),
            textcoords="offset points",
            xytext=(7, 3),
            color=c,
        )
    ax.set(
        xscale="log",
        xlabel=f"KV cache bytes / token (bf16, {SHAPE['layers']} layers)",
        ylabel="SOTU held-out perplexity",
        title="quality vs KV size (o mean, x seeds, bars min..max)",
    )
    ax.grid(alpha=0.3)
    ax = axes[1]
    for v in variants:
        rs = [r for r in res["runs"] if r["variant"] == v]
        mean = [statistics.mean(r["val"][i]["ppl"] for r in rs) for i in range(len(rs[0]["val"]))]
        ax.plot(
            [p["tokens"] / 1e6 for p in rs[0]["val"]][1:],
            mean[1:],
            "o-",
            ms=2.5,
            label=v.upper(),
            color=colors[v],
        )
    ax.set(
        yscale="log",
        xlabel="training tokens (M)",
        ylabel="validation ppl (first 32K SOTU-eval tokens)",
        title="validation curves (mean over seeds)",
    )
    ax.legend()
    ax.grid(alpha=0.3)
    ax = axes[2]
    if gctx:
        width = 0.8 / len(gctx)
        for i, c in enumerate(gctx):
            ax.bar(
                [j + i * width for j in range(len(rows))],
                [r.get(f"graph_us_{c}", float("nan")) for r in rows],
                width,
                label=f"context {c}",
                alpha=0.55 + 0.45 * i / max(1, len(gctx) - 1),
                color=[colors[r["variant"]] for r in rows],
                edgecolor="k",
            )
            for j, r in enumerate(rows):
                ax.annotate(
                    f"{c // 1024}K",
                    (j + i * width, r.get(f"graph_us_{c}", 0)),
                    ha="center",
                    va="bottom",
                    fontsize=7,
                )
        ax.set_xticks(
            [j + width * (len(gctx) - 1) / 2 for j in range(len(rows))], [r["variant"].upper() for r in rows]
        )
        ax.set(
            ylabel="µs per decode step (whole model, CUDA graph)",
            title="decode step, B=64, bf16, Triton (kvslim.kernels)",
        )
        ax.grid(alpha=0.3, axis="y")
    fig.suptitle(
        f"kvslim quality study: {info['gpu']}, torch {info['torch']}, triton {info['triton']}, "
        f"{info['date'][:10]}; {rows[0]['tokens'] / 1e6:.1f}M tokens/run, "
        f"{rows[0]['params'] / 1e6:.1f}M params (±0.3 %), {max(r['seeds'] for r in rows)} seeds",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(out / "quality.png", dpi=120)
    plt.close(fig)

    hdr = (
        "| variant | params | MLP width | KV elems/token/layer | KV bytes/token (all layers) | SOTU ppl mean ± sd "
        "(seeds) | moby-dick ppl | shakespeare ppl | "
        + " | ".join(f"decode µs, graph, ctx {c}" for c in gctx)
        + " | marginal KV TB/s | decode µs eager, ctx 8192 | generate tok/s (B=1, eager) |"
    )
    lines = [hdr, "|" + "---|" * (hdr.count("|") - 1)]
    for r in rows:
        lines.append(
            f"| {r['variant'].upper()} | {r['params'] / 1e6:.2f}M ({r['params_rel_mha']:+.2%}) | {r['ff']} "
            f"| {r['kv_elems_layer']} | {r['kv_bytes_token']:,} "
            f"| **{r['sotu_ppl']:.1f}** ± {r['sotu_sd']:.1f} ({r['sotu_seeds'].replace(' ', ', ')}) "
            f"| {r['moby-dick_ppl']:.0f} ± {r['moby-dick_sd']:.0f} | {r['shakespeare_ppl']:.0f} ± {r['shakespeare_sd']:.0f} | "
            + " | ".join(f"{r.get(f'graph_us_{c}', float('nan')):,.0f}" for c in gctx)
            + f" | {r.get('marginal_kv_tb_s', float('nan')):.2f} | {r.get('eager_us_8192', float('nan')):,.0f} "
            f"| {r.get('generate_tok_s_b1', float('nan')):.0f} |"
        )
    print("\n".join(lines))
    print(
        f"\ncopy bandwidth measured with the graph decode run: {graph['info'].get('copy_tb_s', float('nan')):.2f} TB/s"
    )


# ------------------------------------------------------------------ main
def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    pp = sub.add_parser("prepare")
    pp.add_argument("--snapshot-only", action="store_true", help="only refresh .data/snap from HEAD")
    pp.set_defaults(func=prepare)
    w = sub.add_parser("worker")
    w.add_argument("--variant", required=True)
    w.add_argument("--seed", type=int, default=0)
    w.add_argument("--ff", type=int, required=True)
    w.add_argument("--steps", type=int, required=True)
    w.add_argument("--batch-size", type=int, default=16)
    w.add_argument("--seq-len", type=int, default=512)
    w.add_argument("--lr", type=float, default=1.5e-3)
    w.add_argument("--device", default="cuda")
    w.add_argument("--probe", action="store_true")
    w.add_argument("--save")
    w.add_argument("--eval-max-tokens", type=int, help="cap the final evaluation (smoke tests)")
    w.add_argument("--out", required=True)
    w.set_defaults(func=worker)
    r = sub.add_parser("run")
    r.add_argument("--variants", default=",".join(VARIANTS))
    r.add_argument("--seeds", type=int, default=2)
    r.add_argument("--steps", type=int, default=0, help="0 = from the throughput probe")
    r.add_argument("--probe-steps", type=int, default=40)
    r.add_argument(
        "--train-seconds", type=float, default=270.0, help="training wall budget for the probe's estimate"
    )
    r.add_argument("--max-tokens", type=int, default=10_000_000, help="cap on tokens per run")
    r.add_argument("--batch-size", type=int, default=16)
    r.add_argument("--seq-len", type=int, default=512)
    r.add_argument("--lr", type=float, default=1.5e-3)
    r.add_argument("--decode-batch", type=int, default=64)
    r.add_argument("--contexts", type=lambda s: [int(x) for x in s.split(",")], default=[2048, 8192])
    r.add_argument("--deadline", type=float, default=480.0, help="seconds after start when training is cut")
    r.add_argument("--eval-max-tokens", type=int, help="cap the final evaluation (smoke tests)")
    r.add_argument("--work", default="/tmp/kvslim_quality")
    r.add_argument("--out", default="quality_out")
    r.set_defaults(func=run)
    d = sub.add_parser("decode", help="decode-step timing, eager vs CUDA graph (GPU)")
    d.add_argument("--variants", default=",".join(VARIANTS))
    d.add_argument("--batch", type=int, default=64)
    d.add_argument("--contexts", type=lambda s: [int(x) for x in s.split(",")], default=[2048, 8192])
    d.add_argument("--steps", type=int, default=20)
    d.add_argument("--out", default="quality_out")
    d.set_defaults(func=graph_decode)
    q = sub.add_parser("report")
    q.add_argument("results")
    q.add_argument("--decode", help="decode_results.json of the `decode` subcommand (CUDA-graph timings)")
    q.add_argument("--outdir", default=str(ROOT / "benchmarks" / "results"))
    q.set_defaults(func=report)
    a = p.parse_args(argv)
    a.func(a)


if __name__ == "__main__":
    main()
