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

Usage (from the repo root):
    python -m benchmarks.quality_study prepare            # here: tokenizer + .data/quality/*.npy + code snapshot
    python -m benchmarks.quality_study run                # on the GPU: probe, train 12 runs concurrently, decode bench
    python -m benchmarks.quality_study report RESULTS.json  # here: benchmarks/results/quality.{md,png,csv}

To run against the snapshot of the committed kvslim that ``prepare`` leaves in ``.data/snap``
rather than the working tree, start from there: ``cd .data/snap && PYTHONPATH=../..
python -m benchmarks.quality_study run`` (``kvslim`` then comes from the snapshot, this
package from the repo; the workers inherit both).

The setup (shape, configs, data, snapshot) is in ``quality_setup.py``, one training run and
the decode timings in ``quality_worker.py``, the table and plot in ``quality_report.py``;
the driver that runs the workers concurrently and the command line are here.
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

from benchmarks.quality_report import report
from benchmarks.quality_setup import DATA, ROOT, VARIANTS, matched_configs, prepare
from benchmarks.quality_worker import decode_bench, graph_decode, worker


def _launch(jobs, args_of, logdir: Path, env) -> list:
    """One ``worker`` process per job (flags ``args_of(job)``), output to ``logdir/NAME.log``."""
    procs = []
    for job in jobs:
        log = open(logdir / f"{job['name']}.log", "w")  # noqa: SIM115 (closed in _wait)
        procs.append(
            (
                job,
                subprocess.Popen(
                    [sys.executable, "-m", "benchmarks.quality_study", "worker", *args_of(job)],
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
    # the workers run in this cwd (a run started in .data/snap trains the snapshot's kvslim) and
    # find this package through the repo root on PYTHONPATH
    pythonpath = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "PYTHONPATH": pythonpath}
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
