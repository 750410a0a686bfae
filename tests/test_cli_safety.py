"""The command line as a careless or hostile user drives it: no file loss, early and clear errors.

Every case runs ``python -m kvslim`` in a subprocess (what a user runs), on tiny checkpoints.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kvslim.testing import tiny_model, tiny_spec

ENV = dict(os.environ, TRITON_INTERPRET="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")


def kvslim(*args, env=None, timeout=300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kvslim", *map(str, args)], capture_output=True, text=True,
                          env={**ENV, **(env or {})}, timeout=timeout)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A GQA source (kvslim format, 97-token vocabulary) and a converted-looking MQA dir beside it."""
    root = tmp_path_factory.mktemp("models")
    src = root / "src"
    tiny_model(tiny_spec("gqa-2")).save_pretrained(src)
    conv = root / "converted"
    tiny_model(tiny_spec("mqa")).save_pretrained(conv)
    (conv / "generation_config.json").write_text("{}")
    (root / "notes.txt").write_text("not a model")
    ids = root / "ids.npy"
    import numpy as np

    np.save(ids, np.random.default_rng(0).integers(0, 97, 3000).astype(np.int32))
    return root


def _snapshot(d: Path) -> dict:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def test_train_refuses_to_replace_an_existing_model(models, tmp_path):
    before = _snapshot(models / "converted")
    r = kvslim("train", "--preset", "gqa-2", "--heads", "4", "--head-dim", "16", "--layers", "1", "--text",
               models / "ids.npy", "--val-text", "none", "--tokenizer", "none", "--steps", "2", "--seq-len", "16",
               "--batch-size", "2", "--out", models / "converted", "--device", "cpu", "--quiet")
    assert r.returncode == 2 and "exists and is not empty; pass --force" in r.stderr, r.stderr
    assert _snapshot(models / "converted") == before
    out = tmp_path / "trained"
    tiny_model(tiny_spec("mqa")).save_pretrained(out)
    (out / "generation_config.json").write_text("{}")  # from another model: must not survive
    r = kvslim("train", "--preset", "gqa-2", "--heads", "4", "--head-dim", "16", "--layers", "1", "--text",
               models / "ids.npy", "--val-text", "none", "--tokenizer", "none", "--steps", "2", "--seq-len", "16",
               "--batch-size", "2", "--out", out, "--device", "cpu", "--quiet", "--force")
    assert r.returncode == 0, r.stderr
    assert json.loads((out / "config.json").read_text())["attention"]["kind"] == "gqa"
    assert not (out / "generation_config.json").exists() and (out / "run" / "checkpoint.pt").is_file()
    r = kvslim("train", "--preset", "gqa-2", "--heads", "4", "--head-dim", "16", "--layers", "1", "--text",
               models / "ids.npy", "--val-text", "none", "--tokenizer", "none", "--steps", "2", "--seq-len", "16",
               "--batch-size", "2", "--out", out, "--device", "cpu")
    assert r.returncode == 0 and "resumed" in r.stdout + r.stderr, r.stderr  # its own run resumes, no --force


def test_finetune_never_writes_over_its_source(models):
    before = _snapshot(models / "src")
    for extra in ([], ["--force"]):
        r = kvslim("finetune", "--model", models / "src", "--out", models / "src", "--text", models / "ids.npy",
                   "--val-text", "none", "--steps", "1", "--seq-len", "16", "--batch-size", "2", "--device", "cpu",
                   "--quiet", *extra)
        assert r.returncode == 2 and "is the source" in r.stderr, r.stderr
    assert _snapshot(models / "src") == before
    r = kvslim("finetune", "--model", "/nonexistent/model", "--out", models / "x", "--text", models / "ids.npy")
    assert r.returncode == 2 and "--model '/nonexistent/model' does not exist" in r.stderr, r.stderr


def test_convert_force_never_replaces_a_parent_or_a_non_model_dir(models):
    before = _snapshot(models)
    r = kvslim("convert", "--model", models / "src", "--to", "gqa", "--kv-heads", "1", "--out", models, "--force")
    assert r.returncode == 2 and "contains the source" in r.stderr, r.stderr
    parent = models.parent / "home"
    (parent / "a").mkdir(parents=True)
    (parent / "a" / "f.txt").write_text("x")
    r = kvslim("convert", "--model", models / "src", "--to", "gqa", "--kv-heads", "1", "--out", parent, "--force")
    assert r.returncode == 2 and "is not a model directory" in r.stderr and (parent / "a" / "f.txt").exists()
    assert _snapshot(models) == before


def test_convert_killed_while_writing_is_cleaned_up_next_run(models, tmp_path):
    out = tmp_path / "out"
    r = kvslim("convert", "--model", models / "src", "--to", "gqa", "--kv-heads", "1", "--out", out,
               env={"KVSLIM_CRASH_AT": "partial"})
    assert r.returncode == -signal.SIGKILL
    assert [p.name for p in tmp_path.iterdir()] and not out.exists()  # a hidden partial directory was left
    r = kvslim("convert", "--model", models / "src", "--to", "gqa", "--kv-heads", "1", "--out", out)
    assert r.returncode == 0 and "removed" in r.stderr and "interrupted write" in r.stderr, r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    old = os.umask(0o022)
    os.umask(old)
    if old == 0o022:
        assert oct(out.stat().st_mode & 0o777) == "0o755"
        assert oct((out / "model.safetensors").stat().st_mode & 0o777) == "0o644"


def test_outputs_are_checked_before_any_work(models):
    r = kvslim("convert", "--model", models / "src", "--to", "gqa", "--kv-heads", "1", "--out", "/proc/kvslim/out")
    assert r.returncode == 2 and "not writable" in r.stderr, r.stderr
    r = kvslim("eval", "ppl", "--model", models / "src", "--text", models / "ids.npy", "--json", "/proc/x/y.json")
    assert r.returncode == 2 and "--json" in r.stderr and "not writable" in r.stderr, r.stderr
    r = kvslim("plan", "--preset", "gqa-4", "--plot", "/proc/x/y.png")
    assert r.returncode == 2 and "--plot" in r.stderr, r.stderr
    r = kvslim("plan", "--preset", "gqa-4", "--flops", "inf")
    assert r.returncode == 2 and "finite" in r.stderr


def test_corrupt_checkpoints_are_named_by_every_command(models, tmp_path):
    bad = tmp_path / "bad"
    tiny_model(tiny_spec("gqa-2")).save_pretrained(bad)
    st = bad / "model.safetensors"
    st.write_bytes(st.read_bytes()[: st.stat().st_size // 2])
    cases = [
        ("convert", "--model", bad, "--to", "gqa", "--kv-heads", "1", "--out", tmp_path / "o"),
        ("eval", "ppl", "--model", bad, "--text", models / "ids.npy"),
        ("generate", "--model", bad, "--tokens", "1,2", "--num-pages", "16", "--device", "cpu"),
        ("finetune", "--model", bad, "--out", tmp_path / "f", "--text", models / "ids.npy", "--val-text", "none"),
    ]
    for args in cases:
        r = kvslim(*args)
        assert r.returncode == 2, (args, r.stderr[-2000:])
        assert "model.safetensors" in r.stderr and "corrupt or truncated" in r.stderr, (args, r.stderr)
        assert "Traceback" not in r.stderr
    (bad / "config.json").write_text('{"model_type": "llama", ')
    r = kvslim("eval", "ppl", "--model", bad, "--text", models / "ids.npy")
    assert r.returncode == 2 and "config.json is not valid JSON" in r.stderr


@pytest.mark.parametrize("change,match", [
    ({"num_attention_heads": 0}, "'num_attention_heads' must be >= 1"),
    ({"hidden_size": "4096"}, "'hidden_size' must be an int"),
    ({"model_type": "gpt2"}, "qwen3"),
    ({"rope_scaling": {"rope_type": "dynamic", "factor": 2.0}}, "rope_type must be one of"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": "big"}}, "rope_scaling"),
])
def test_bad_hf_configs_name_the_field(tmp_path, change, match):
    cfg = dict(model_type="llama", hidden_size=64, num_attention_heads=4, num_key_value_heads=2, vocab_size=97,
               intermediate_size=128, num_hidden_layers=2, max_position_embeddings=64)
    (tmp_path / "config.json").write_text(json.dumps({**cfg, **change}))
    r = kvslim("plan", "--hf-config", tmp_path / "config.json")
    assert r.returncode == 2 and match in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_planner_accepts_mixtral_and_convert_refuses_bad_freqfold(models, tmp_path):
    cfg = dict(model_type="mixtral", hidden_size=4096, num_attention_heads=32, num_key_value_heads=8,
               num_hidden_layers=32, num_local_experts=8)
    (tmp_path / "mixtral.json").write_text(json.dumps(cfg))
    r = kvslim("plan", "--hf-config", tmp_path / "mixtral.json")
    assert r.returncode == 0 and "gqa-8" in r.stdout, r.stderr
    r = kvslim("convert", "--model", models / "src", "--to", "mla", "--kv-lora-rank", "8", "--rope-dim", "8",
               "--freqfold", "0", "--out", tmp_path / "o")
    assert r.returncode == 2 and "freqfold" in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert torch.cuda.is_available() or not (tmp_path / "o").exists()
