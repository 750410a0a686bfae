"""The quality study's fixed setup: model shape, variants, equal-size configs, data and code snapshot.

``SHAPE`` (``KVSLIM_QS_TINY=1``: a CPU-sized one), ``VARIANTS`` and ``EVAL_SETS`` are what every
run shares; ``matched_configs`` picks each variant's MLP width for equal parameter count;
``prepare`` trains the BPE tokenizer and writes the token files under ``.data/quality``;
``snapshot`` copies the committed ``kvslim/`` to ``.data/snap``.
"""

from __future__ import annotations

import json
import os
import subprocess
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


def snapshot() -> str:
    """Copy the committed kvslim/ into .data/snap (the device runs it; the working tree is shared).

    A run started in .data/snap imports that ``kvslim`` (the cwd comes first on ``sys.path``)
    and this package from the repo root on ``PYTHONPATH``; see quality_study's docstring.
    """
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
    from kvslim.eval.tokenizer import save_tokenizer, train_bpe
    from kvslim.eval.tokens import load_tokens, save_tokens, source_text

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
