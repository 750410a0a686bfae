"""Peak memory of ``kvslim convert``: in-memory vs streaming (layer by layer), and how it grows with depth.

Each conversion runs in a fresh subprocess (``--child``) that reports its peak resident set
(``VmHWM`` of /proc/self/status; ``ru_maxrss`` as a cross-check) and its resident set right
before converting (torch + kvslim imported: the floor every run pays). Cases:

* SmolLM2-135M (``smollm2_dir()``, real calibration text) -> MLA r=128, DeepSeek export;
* random models of SmolLM2's width (D=576, 9 heads, 3 KV heads, d_h=64, FFN 1536, vocab 49152,
  tied embeddings) with 8/16/32/64 layers, written to a temporary directory (random calibration
  tokens), same conversion;
* optionally (``--qwen``) Qwen2.5-Coder-0.5B (biases: kvslim format; random calibration tokens) if it
  is in the kvslim cache.

Streaming's peak should stay flat with depth (embeddings + one layer + calibration activations);
the in-memory path's grows with the parameter count. Results: ``results/convert_memory.{md,json}``.

    python -m benchmarks.convert_memory            # ~5-10 min on 2 CPU cores
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

SMOL_WIDTH = dict(hidden_size=576, num_heads=9, num_kv_heads=3, head_dim=64, intermediate_size=1536, vocab_size=49152)


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def child(args) -> None:
    """One conversion in this (fresh) process; prints a JSON line with its memory."""
    import torch

    from kvslim.convert import convert_checkpoint

    torch.set_num_threads(args.threads)
    calib = torch.load(args.calib_file)
    floor = _status_kb("VmRSS")
    t0 = time.time()
    res = convert_checkpoint(model_dir=args.model, out=args.out, stream=args.mode == "stream", progress=False,
                             calib_tokens=calib, **json.loads(args.opts))
    print(json.dumps({"peak_mb": _status_kb("VmHWM") / 1024, "floor_mb": floor / 1024,
                      "ru_maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                      "seconds": time.time() - t0, "layers": res.num_layers}))


def _synthetic(root: Path, layers: int) -> Path:
    """A random SmolLM2-width kvslim checkpoint with ``layers`` layers (built in a subprocess: its memory
    is not the parent's concern, but this keeps the parent small)."""
    out = root / f"synthetic-{layers}"
    if (out / "config.json").is_file():
        return out
    code = f"""
import torch
from kvslim.model import ModelConfig, Transformer
from kvslim.spec import AttentionSpec
w = {SMOL_WIDTH!r}
spec = AttentionSpec(kind="gqa", hidden_size=w["hidden_size"], num_heads=w["num_heads"],
                     num_kv_heads=w["num_kv_heads"], head_dim=w["head_dim"], rope_theta=100000.0)
cfg = ModelConfig(vocab_size=w["vocab_size"], hidden_size=w["hidden_size"], intermediate_size=w["intermediate_size"],
                  num_layers={layers}, attention=spec, tie_word_embeddings=True, rms_norm_eps=1e-5)
torch.manual_seed(0)
Transformer(cfg).save_pretrained({str(out)!r})
"""
    subprocess.run([sys.executable, "-c", code], check=True)
    return out


def run_case(model: Path, mode: str, opts: dict, tmp: Path, calib_file: Path, args) -> dict:
    out = tmp / f"out-{mode}-{model.name}"
    cmd = [sys.executable, "-m", "benchmarks.convert_memory", "--child", "--model", str(model), "--mode", mode,
           "--out", str(out), "--opts", json.dumps(opts), "--calib-file", str(calib_file),
           "--threads", str(args.threads)]
    p = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if p.returncode:
        raise RuntimeError(f"{mode} {model}: exit {p.returncode}\n{p.stderr[-3000:]}")
    row = json.loads(p.stdout.strip().splitlines()[-1])
    size = sum(f.stat().st_size for f in model.glob("*.safetensors")) / 2**20
    row.update(model=model.name, mode=mode, source_mb=size)
    subprocess.run(["rm", "-rf", str(out)], check=True)
    print(f"{model.name:24s} {mode:8s} layers={row['layers']:3d} source={size:7.0f} MB peak={row['peak_mb']:7.0f} MB "
          f"(floor {row['floor_mb']:.0f} MB) {row['seconds']:.1f} s", flush=True)
    return row


def _markdown(rows: list[dict], meta: dict) -> str:
    lines = [
        "# Conversion peak memory: in-memory vs streaming",
        "",
        f"{meta['date']}, {meta['machine']}, torch {meta['torch']}, {meta['threads']} thread(s); "
        f"calibration {meta['calib_samples']} x {meta['calib_seq_len']} tokens; "
        "each conversion in a fresh process. Peak = VmHWM of /proc/self/status; floor = resident set "
        "after importing torch + kvslim, before converting; above floor = peak - floor.",
        "",
        "| model | layers | source (fp32 MB) | target | in-memory peak MB (above floor) | streaming peak MB "
        "(above floor) | streaming / in-memory (above floor) | seconds in-memory / streaming |",
        "|---|---|---|---|---|---|---|---|",
    ]
    by = {}
    for r in rows:
        by.setdefault(r["model"], {})[r["mode"]] = r
    for name, d in by.items():
        m, s = d.get("memory"), d.get("stream")
        ref = m or s

        def cell(r):
            return f"{r['peak_mb']:.0f} ({r['peak_mb'] - r['floor_mb']:.0f})" if r else "-"
        ratio = (f"{(s['peak_mb'] - s['floor_mb']) / (m['peak_mb'] - m['floor_mb']):.2f}" if m and s else "-")
        secs = f"{m['seconds']:.1f} / {s['seconds']:.1f}" if m and s else "-"
        lines.append(f"| {name} | {ref['layers']} | {ref['source_mb']:.0f} | {ref['target']} | {cell(m)} | {cell(s)} "
                     f"| {ratio} | {secs} |")
    syn = sorted((r for r in rows if r["model"].startswith("synthetic")), key=lambda r: r["layers"])
    for mode in ("memory", "stream"):
        pts = [(r["layers"], r["peak_mb"] - r["floor_mb"]) for r in syn if r["mode"] == mode]
        if len(pts) >= 2:
            (l0, p0), (l1, p1) = pts[0], pts[-1]
            lines.append("")
            lines.append(f"- synthetic, {'in-memory' if mode == 'memory' else 'streaming'}: above-floor peak "
                         f"{p0:.0f} MB at {l0} layers -> {p1:.0f} MB at {l1} layers, "
                         f"{(p1 - p0) / (l1 - l0):.1f} MB per extra layer (one fp32 layer of this width is "
                         f"{meta['layer_mb']:.1f} MB)")
    lines += ["", "Streaming output is byte-identical to the in-memory output (tests/test_convert_stream.py)."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--model", help=argparse.SUPPRESS)
    ap.add_argument("--mode", choices=["memory", "stream"], help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    ap.add_argument("--opts", default="{}", help=argparse.SUPPRESS)
    ap.add_argument("--calib-file", help=argparse.SUPPRESS)
    ap.add_argument("--layers", default="8,16,32,64", help="synthetic depths")
    ap.add_argument("--calib-samples", type=int, default=4)
    ap.add_argument("--calib-seq-len", type=int, default=256)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--qwen", action="store_true", help="also Qwen2.5-0.5B from the kvslim cache (if present)")
    ap.add_argument("--results", default="benchmarks/results/convert_memory")
    args = ap.parse_args(argv)
    if args.child:
        return child(args)

    import torch

    from kvslim.convert.calib import calibration_tokens
    from kvslim.eval.data import cache_dir
    from kvslim.eval.smollm2 import smollm2_dir

    mla = dict(to="mla", kv_lora_rank=128)
    rows = []
    with tempfile.TemporaryDirectory(prefix="kvslim-convert-memory-") as t:
        tmp = Path(t)
        n, T = args.calib_samples, args.calib_seq_len
        # calibration windows are made once, here: tokenizing a corpus costs the same in both modes (and
        # more than either conversion, see the notes), so the children measure the conversion alone
        t0 = time.time()
        smol = smollm2_dir()
        torch.save(calibration_tokens(smol, num_samples=n, seq_len=T), tmp / "calib-smollm2.pt")
        print(f"calibration windows (sotu, tokenized once): {time.time() - t0:.1f} s", flush=True)
        torch.save(torch.randint(0, SMOL_WIDTH["vocab_size"], (n, T), generator=torch.Generator().manual_seed(0)),
                   tmp / "calib-random.pt")
        cases = [(smol, mla, tmp / "calib-smollm2.pt")]
        cases += [(_synthetic(tmp, int(d)), mla, tmp / "calib-random.pt") for d in args.layers.split(",")]
        qwen = cache_dir() / "models" / "qwen2.5-coder-0.5b-instruct"
        if args.qwen and (qwen / "model.safetensors").is_file():
            vocab = json.loads((qwen / "config.json").read_text())["vocab_size"]  # random windows: no 2nd tokenizer pass
            torch.save(torch.randint(0, vocab, (n, T), generator=torch.Generator().manual_seed(0)), tmp / "calib-qwen.pt")
            cases.append((qwen, dict(mla, fmt="kvslim"), tmp / "calib-qwen.pt"))
        for model, opts, calib_file in cases:
            for mode in ("stream", "memory"):
                row = run_case(model, mode, opts, tmp, calib_file, args)
                row["target"] = f"{opts['to']} r={opts['kv_lora_rank']} ({opts.get('fmt', 'deepseek')})"
                rows.append(row)
    w = SMOL_WIDTH
    D, qo, kv = w["hidden_size"], w["num_heads"] * w["head_dim"], w["num_kv_heads"] * w["head_dim"]
    layer_params = 2 * D * qo + 2 * D * kv + 3 * D * w["intermediate_size"] + 2 * D  # q,o; k,v; MLP; 2 norms
    meta = {"date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "machine": platform.processor()
            or platform.machine(), "torch": torch.__version__, "threads": args.threads,
            "calib_samples": args.calib_samples, "calib_seq_len": args.calib_seq_len,
            "layer_mb": layer_params * 4 / 2**20}
    res = Path(args.results)
    res.parent.mkdir(parents=True, exist_ok=True)
    res.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    res.with_suffix(".md").write_text(_markdown(rows, meta))
    print(res.with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
