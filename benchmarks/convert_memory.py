"""Peak memory of ``kvslim convert``: in-memory vs streaming (layer by layer), and how it grows with depth.

Each conversion runs in a fresh subprocess (``--child``) that reports its peak resident set
(``VmHWM`` of /proc/self/status; ``ru_maxrss`` as a cross-check) and its resident set right
before converting (torch + kvslim imported: the floor every run pays). Cases:

* SmolLM2-135M (``smollm2_dir()``, real calibration text) -> MLA r=128, DeepSeek export;
* random models of SmolLM2's width (D=576, 9 heads, 3 KV heads, d_h=64, FFN 1536, vocab 49152,
  tied embeddings) with 8/16/32/64 layers, written to a temporary directory (random calibration
  tokens), same conversion;
* optionally (``--qwen``) Qwen2.5-Coder-0.5B (biases: kvslim format; random calibration tokens) if it
  is in the kvslim cache;
* only with ``--llama8b`` (and then alone): a random-weight checkpoint of Llama-3-8B's exact shape (32
  layers, D=4096, 32 query / 8 KV heads, d_h=128, FFN 14336, vocab 128256, untied, RoPE theta 5e5,
  bf16, HF Llama ``config.json``, ~5 GB shards + index), written shard by shard and tensor by tensor
  (:func:`write_random_llama`: one tensor in memory at a time), streamed to MLA r=512 + d_R=64
  (DeepSeek-V3's 576-wide latent+RoPE row, 28 % of the GQA cache) in bf16, and the output then checked
  tensor by tensor (:func:`verify_output`). Its row is merged into the existing results. Needs ~16 GB
  free disk for the source and ~15 GB for the output (both deleted afterwards); ``--llama8b-layers N``
  builds the same width with N layers (quicker; its own row).

Streaming's peak should stay flat with depth (embeddings + one layer + calibration activations);
the in-memory path's grows with the parameter count. Results: ``results/convert_memory.{md,json}``.

    python -m benchmarks.convert_memory            # ~5-10 min on 2 CPU cores
    python -m benchmarks.convert_memory --llama8b --calib-samples 4 --calib-seq-len 128 --threads 2
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

# Llama-3-8B (meta-llama/Meta-Llama-3-8B config.json): the shape of the --llama8b case
LLAMA3_8B = dict(num_layers=32, hidden_size=4096, num_heads=32, num_kv_heads=8, head_dim=128, intermediate_size=14336,
                 vocab_size=128256, rope_theta=500000.0, rms_norm_eps=1e-5, tie_word_embeddings=False,
                 max_position_embeddings=8192)
LLAMA8B_TARGET = dict(to="mla", kv_lora_rank=512, rope_dim=64, dtype="bfloat16")
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
    res = convert_checkpoint(model_dir=args.model, out=args.out, stream=args.mode == "stream",
                             progress=args.progress, calib_tokens=calib, **json.loads(args.opts))
    print(json.dumps({"peak_mb": _status_kb("VmHWM") / 1024, "floor_mb": floor / 1024,
                      "ru_maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                      "seconds": time.time() - t0, "layers": res.num_layers,
                      "fp16_ok": res.export.get("fp16_ok"), "target_kind": res.target.kind,
                      "latent_dim": res.target.latent_dim, "rope_dim": res.target.rope_dim}))


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


def write_random_llama(out, shape: dict, *, shard_bytes: int = 5 * 10**9, std: float = 0.02, seed: int = 0,
                       dtype=None) -> dict:
    """A random-weight Hugging Face Llama directory of ``shape`` (``LLAMA3_8B``'s keys), never holding more
    than one tensor: shards of at most ``shard_bytes`` (HF's ``model-0000i-of-0000n.safetensors`` + the
    ``model.safetensors.index.json`` weight map), each laid out up front and filled tensor by tensor with
    kvslim's incremental writer. Weights ~ N(0, ``std``) (HF's init), norms 1; ``config.json`` is written
    last (a directory with one is complete). Returns ``{"bytes", "shards", "tensors"}``."""
    import torch

    from kvslim.convert.export import hf_llama_config
    from kvslim.convert.tensorio import SafetensorsWriter
    from kvslim.model import ModelConfig, Transformer
    from kvslim.spec import AttentionSpec

    dtype = dtype or torch.bfloat16
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    spec = AttentionSpec(kind="gqa", hidden_size=shape["hidden_size"], num_heads=shape["num_heads"],
                         num_kv_heads=shape["num_kv_heads"], head_dim=shape["head_dim"], rope_theta=shape["rope_theta"])
    cfg = ModelConfig(vocab_size=shape["vocab_size"], hidden_size=shape["hidden_size"],
                      intermediate_size=shape["intermediate_size"], num_layers=shape["num_layers"], attention=spec,
                      tie_word_embeddings=shape["tie_word_embeddings"], rms_norm_eps=shape["rms_norm_eps"],
                      max_position_embeddings=shape["max_position_embeddings"])
    with torch.device("meta"):  # names and shapes only
        one = Transformer(ModelConfig(**{**cfg.to_dict(), "num_layers": 1, "vocab_size": 1})).state_dict()
    pre = "model.layers.0."
    layer = {k[len(pre):]: tuple(v.shape) for k, v in one.items() if k.startswith(pre)}
    V, D = cfg.vocab_size, cfg.hidden_size
    names = {"model.embed_tokens.weight": (V, D)}
    names.update({f"model.layers.{i}.{k}": s for i in range(cfg.num_layers) for k, s in layer.items()})
    names["model.norm.weight"] = (D,)
    if not cfg.tie_word_embeddings:
        names["lm_head.weight"] = (V, D)
    shards: list[list[str]] = [[]]
    size = 0
    for n, s in names.items():  # HF order: embeddings, layer by layer, norm, head
        b = math.prod(s) * dtype.itemsize
        if shards[-1] and size + b > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(n)
        size += b
    gen = torch.Generator().manual_seed(seed)
    weight_map, total = {}, 0
    for j, group in enumerate(shards):
        fname = f"model-{j + 1:05d}-of-{len(shards):05d}.safetensors"
        w = SafetensorsWriter(out / fname, {n: (dtype, names[n]) for n in group}, {"format": "pt"})
        try:
            for n in group:
                if n.endswith("norm.weight"):
                    t = torch.ones(names[n], dtype=dtype)
                else:
                    t = torch.empty(names[n], dtype=dtype).normal_(0.0, std, generator=gen)
                w.write(n, t)
                total += t.numel() * dtype.itemsize
                weight_map[n] = fname
                del t
            w.close()
        finally:
            w.abort()
    (out / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    hf = {**hf_llama_config(cfg, dtype), "bos_token_id": 128000, "eos_token_id": 128001}
    (out / "config.json").write_text(json.dumps(hf, indent=2))
    return {"bytes": total, "shards": len(shards), "tensors": len(names)}


def verify_output(out) -> dict:
    """Check a converted directory without loading it: ``LazyCheckpoint`` matches every tensor's name and
    shape against its ``config.json`` (all layers present, nothing extra), then each tensor is read alone
    and must be finite. Returns counts, bytes, the largest |value| and the layers found."""
    import torch

    from kvslim.convert.tensorio import LazyCheckpoint

    ck = LazyCheckpoint(out)
    layers = sorted({int(n.split(".")[2]) for n in ck.shapes if n.startswith("model.layers.")})
    if layers != list(range(ck.config.num_layers)):
        raise ValueError(f"{out}: layers {layers[:3]}..{layers[-3:]} != 0..{ck.config.num_layers - 1}")
    amax, nonfinite = 0.0, []
    for n in ck.shapes:
        t = ck.tensors([n])[n]
        if not bool(torch.isfinite(t).all()):
            nonfinite.append(n)
        amax = max(amax, float(t.abs().max()))
        del t
    if nonfinite:
        raise ValueError(f"{out}: non-finite tensors {nonfinite[:5]}")
    files = sorted(Path(out).glob("*.safetensors"))
    return {"tensors": len(ck.shapes), "layers": len(layers), "files": len(files), "max_abs": amax,
            "bytes": sum(f.stat().st_size for f in files), "num_params": ck.num_params,
            "config_layers": ck.config.num_layers, "kind": ck.config.attention.kind}


def _peak(fn, *args, **kw) -> dict:
    """``fn``'s result with this process's peak resident set and wall time (a child's JSON line)."""
    t0 = time.time()
    res = fn(*args, **kw)
    return {**res, "peak_mb": _status_kb("VmHWM") / 1024, "seconds": time.time() - t0}


def _child_json(cmd: list[str], what: str, show_progress: bool = False) -> dict:
    """Run a ``--child*`` command in a fresh process; its last stdout line (JSON)."""
    p = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=None if show_progress else subprocess.PIPE, text=True,
                       env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if p.returncode:
        raise RuntimeError(f"{what}: exit {p.returncode}\n{(p.stderr or '')[-3000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def run_case(model: Path, mode: str, opts: dict, tmp: Path, calib_file: Path, args, *, verify: bool = False,
             show_progress: bool = False) -> dict:
    """One conversion in a fresh process (its peak memory); ``verify``: check the output tensor by tensor
    (:func:`verify_output`, another fresh process) before it is deleted."""
    out = tmp / f"out-{mode}-{model.name}"
    me = [sys.executable, "-m", "benchmarks.convert_memory"]
    cmd = me + ["--child", "--model", str(model), "--mode", mode, "--out", str(out), "--opts", json.dumps(opts),
                "--calib-file", str(calib_file), "--threads", str(args.threads)]
    row = _child_json(cmd + (["--progress"] if show_progress else []), f"{mode} {model}", show_progress)
    size = sum(f.stat().st_size for f in model.glob("*.safetensors")) / 2**20
    row.update(model=model.name, mode=mode, source_mb=size)
    if verify:
        row["verify"] = _child_json(me + ["--child-verify", str(out), "--threads", str(args.threads)], f"verify {out}")
        print(f"verified {out}: {json.dumps(row['verify'])}", flush=True)
    subprocess.run(["rm", "-rf", str(out)], check=True)
    print(f"{model.name:24s} {mode:8s} layers={row['layers']:3d} source={size:7.0f} MB peak={row['peak_mb']:7.0f} MB "
          f"(floor {row['floor_mb']:.0f} MB) {row['seconds']:.1f} s", flush=True)
    return row


def _markdown(rows: list[dict], meta: dict, big: list[dict] | None = None) -> str:
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
    if big:
        lines += ["", _llama8b_markdown(big)]
    return "\n".join(lines) + "\n"


def _llama8b_markdown(runs: list[dict]) -> str:
    """The ``--llama8b`` section: one table row per run (each labelled by the commit it ran), then its checks."""
    gb = 2**30 / 2**20
    m0, w0 = runs[0]["meta"], runs[0]["row"]["writer"]
    lines = [
        "## Llama-3-8B shape, random weights, streaming only (`--llama8b`)",
        "",
        "Source: Llama-3-8B's exact shape (32 layers, D=4096, 32 query / 8 KV heads, d_h=128, FFN 14336, vocab "
        "128256, untied embeddings, RoPE theta 5e5, HF Llama config.json), weights N(0, 0.02), norms 1, bf16, "
        f"written shard by shard and tensor by tensor (32 layers: {w0['shards']} shards + index, "
        f"{runs[0]['row']['source_mb'] / gb:.2f} GiB; the writer's peak {w0['peak_mb']:.0f} MB; rows with fewer layers: "
        "the same width, less deep). Calibration: random "
        "token windows. Target: MLA kv_lora_rank 512 + RoPE dim 64 (DeepSeek-V3's 576-wide cached row: 28 % of "
        "the GQA cache's 2 x 8 x 128 per layer), DeepSeek format, bf16 output. The in-memory path was not run: it "
        f"loads the model in fp32 ({w0['bytes'] * 2 / 2**30:.1f} GiB), more than this machine's "
        f"{m0['ram_gb']:.0f} GiB of RAM.",
        "",
        "| code (commit) | date | layers | source bf16 GiB (fp32 GiB) | threads | calibration | streaming peak MB "
        "(above floor) | peak / bf16 source | peak / fp32 size | seconds | output GiB |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for run in runs:
        m, r = run["meta"], run["row"]
        lines.append(
            f"| {m.get('code', '-')} | {m['date']} | {r['layers']} | {r['source_mb'] / gb:.2f} ({r['fp32_mb'] / gb:.1f}) "
            f"| {m['threads']} | {m['calib_samples']} x {m['calib_seq_len']} "
            f"| {r['peak_mb']:.0f} ({r['peak_mb'] - r['floor_mb']:.0f}) | {r['peak_mb'] / r['source_mb']:.2f} "
            f"| {r['peak_mb'] / r['fp32_mb']:.2f} | {r['seconds']:.0f} | {r['verify']['bytes'] / 2**30:.2f} |")
    lines.append("")
    for run in runs:
        m, r = run["meta"], run["row"]
        v = r["verify"]
        lines.append(
            f"- {m.get('code', '-')}: {m['machine']}, {m['cpus']} CPU cores (shared with other jobs: wall times are "
            f"indicative), {m['ram_gb']:.0f} GiB RAM, torch {m['torch']}. Output checked without loading it (a "
            f"fresh process, peak {v['peak_mb']:.0f} MB, {v['seconds']:.0f} s): config.json ({v['kind']}, "
            f"{v['config_layers']} layers) matches every tensor's name and shape ({v['tensors']} tensors in "
            f"{v['files']} file(s), layers 0..{v['layers'] - 1} all present, nothing extra), every tensor finite "
            f"(max |w| {v['max_abs']:.3g}); DeepSeek export fp16-representable: {r['fp16_ok']}. Floor (torch + "
            f"kvslim imported) {r['floor_mb']:.0f} MB." + (f" {m['note']}" if m.get("note") else ""))
    return "\n".join(lines)


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
    ap.add_argument("--llama8b", action="store_true",
                    help="run only the Llama-3-8B-shaped random checkpoint (streaming; ~16+15 GB of temporary disk), "
                    "merged into the existing results")
    ap.add_argument("--llama8b-layers", type=int, default=32,
                    help="layers of the --llama8b checkpoint (a smaller depth: a quicker run of the same width, saved as "
                    "its own row)")
    ap.add_argument("--workdir", help="where the temporary checkpoints go (default: the system temp dir)")
    ap.add_argument("--note", default="", help="--llama8b: a remark stored with the run")
    ap.add_argument("--progress", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--child-write", metavar="DIR", help=argparse.SUPPRESS)
    ap.add_argument("--shape", default="{}", help=argparse.SUPPRESS)
    ap.add_argument("--child-verify", metavar="DIR", help=argparse.SUPPRESS)
    ap.add_argument("--results", default="benchmarks/results/convert_memory")
    args = ap.parse_args(argv)
    if args.child:
        return child(args)
    if args.child_write or args.child_verify:
        import torch

        torch.set_num_threads(args.threads)
        res = (_peak(write_random_llama, args.child_write, json.loads(args.shape)) if args.child_write
               else _peak(verify_output, args.child_verify))
        print(json.dumps(res))
        return None
    if args.llama8b:
        return run_llama8b(args)

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
    old = json.loads(res.with_suffix(".json").read_text()) if res.with_suffix(".json").is_file() else {}
    _save(res, {"meta": meta, "rows": rows, **({"llama8b": old["llama8b"]} if "llama8b" in old else {})})


def _commit() -> str:
    """This checkout's commit (short), ``+dirty`` with uncommitted changes; ``-`` outside git."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "-"
    return head.stdout.strip() + ("+dirty" if dirty else "")


def _save(res: Path, data: dict) -> None:
    res.with_suffix(".json").write_text(json.dumps(data, indent=2))
    res.with_suffix(".md").write_text(_markdown(data["rows"], data["meta"], data.get("llama8b")))
    print(res.with_suffix(".md").read_text())


def run_llama8b(args) -> None:
    """The ``--llama8b`` case (module docstring): write the random checkpoint (a fresh process), convert it
    streaming (another: its peak memory), check the output (a third), delete both; merge the row into
    the results when the depth is Llama-3-8B's."""
    import torch

    shape = dict(LLAMA3_8B, num_layers=args.llama8b_layers)
    me = [sys.executable, "-m", "benchmarks.convert_memory"]
    with tempfile.TemporaryDirectory(prefix="kvslim-llama8b-", dir=args.workdir) as t:
        tmp = Path(t)
        src = tmp / f"llama3-8b-shape-random-{shape['num_layers']}L"
        writer = _child_json(me + ["--child-write", str(src), "--shape", json.dumps(shape), "--threads",
                                   str(args.threads)], f"write {src}")
        print(f"wrote {src}: {json.dumps(writer)}", flush=True)
        calib = torch.randint(0, shape["vocab_size"], (args.calib_samples, args.calib_seq_len),
                              generator=torch.Generator().manual_seed(0))
        torch.save(calib, tmp / "calib-random.pt")
        row = run_case(src, "stream", LLAMA8B_TARGET, tmp, tmp / "calib-random.pt", args, verify=True,
                       show_progress=True)
    o = LLAMA8B_TARGET
    row.update(writer=writer, fp32_mb=writer["bytes"] * 2 / 2**20,
               target=f"{o['to']} r={o['kv_lora_rank']} + d_R={o['rope_dim']} (deepseek, {o['dtype']})")
    meta = {"date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
            "ram_gb": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, "torch": torch.__version__,
            "threads": args.threads, "calib_samples": args.calib_samples, "calib_seq_len": args.calib_seq_len,
            "shape": shape, "code": _commit(), "note": args.note}
    print(json.dumps({"meta": meta, "row": row}, indent=2))
    res = Path(args.results)
    data = json.loads(res.with_suffix(".json").read_text())
    data.setdefault("llama8b", []).append({"meta": meta, "row": row})
    _save(res, data)


if __name__ == "__main__":
    main()
