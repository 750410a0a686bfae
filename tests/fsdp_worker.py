"""One rank of tests/test_train_fsdp.py, launched by ``torchrun --nproc-per-node 2`` (gloo, CPU).

Three runs in one launch (a launch costs ~20 s of imports on a 2-core machine):

* ``fresh``: ``kvslim.train.finetune`` with distillation, from scratch;
* ``resumed``: the same run interrupted after ``stop`` steps (``train(stop_after=...)``, which
  writes an FSDP checkpoint), then resumed by ``finetune`` from that checkpoint;
* ``cli``: ``python -m kvslim finetune`` (run as ``__main__`` here, as ``-m`` does) with the LM
  loss, gradient accumulation, attention-only and no clipping; it ends the process group.

Usage: ``torchrun ... tests/fsdp_worker.py JOB.json`` where the JSON holds the paths and settings.
"""

import json
import runpy
import sys
from pathlib import Path

import torch

from kvslim.eval.tokens import load_tokens
from kvslim.model import load_model
from kvslim.train import TrainConfig, finetune, train


def main(job_path: str) -> None:
    job = json.loads(Path(job_path).read_text())
    torch.set_num_threads(1)
    data = {"text": job["text"], "val_text": job["val_text"]}
    kw = job["distill"]
    finetune(model=job["student"], teacher=job["teacher"], out=job["fresh"], progress=False, **data, **kw)

    student, teacher = load_model(job["student"]), load_model(job["teacher"])
    ids, val = load_tokens(job["text"]), load_tokens(job["val_text"])
    train(student, ids, config=TrainConfig(loss="distill", **kw), val_tokens=val, teacher=teacher,
          out_dir=f"{job['resumed']}/run", stop_after=job["stop"], eval_at_start=True, progress=False)
    finetune(model=job["student"], teacher=job["teacher"], out=job["resumed"], progress=False, **data, **kw)

    sys.argv = ["kvslim", *job["cli"]]
    try:
        runpy.run_module("kvslim", run_name="__main__", alter_sys=True)
    except SystemExit as e:
        if e.code:
            raise


if __name__ == "__main__":
    main(sys.argv[1])
