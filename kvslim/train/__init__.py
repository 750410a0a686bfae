"""Training and fine-tuning of ``kvslim.model.Transformer``: one loop, two losses.

| piece | module |
|---|---|
| ``TrainConfig``, LR schedule | ``config.py`` |
| distillation loss, KL to a teacher (full logits, or chunked from hidden states) | ``distill.py`` |
| the loop, batches, checkpoints with exact resume | ``loop.py`` |
| ``train_log.csv`` + ``curves.png`` | ``curves.py`` |
| ``train_lm`` / ``finetune`` (the CLI commands' calls) | ``run.py`` |
| ``torchrun``: FSDP2 sharding, per-rank batch slices, rank-0 I/O | ``dist.py`` |

* ``loss="lm"``: next-token cross-entropy (pre-training from a spec, or plain fine-tuning);
* ``loss="distill"``: KL(teacher || student) at temperature T, optionally over the teacher's
  top-k logits, optionally mixed with the LM loss (GQA paper §2 uptraining, TransMLA §5).
"""

from kvslim.train.config import TrainConfig, lr_at
from kvslim.train.curves import save_curves
from kvslim.train.distill import chunked_distill_loss, distill_loss, mean_kl
from kvslim.train.loop import get_batch, train
from kvslim.train.run import build_model, finetune, train_lm

__all__ = [
    "TrainConfig", "build_model", "chunked_distill_loss", "distill_loss", "finetune", "get_batch", "lr_at",
    "mean_kl", "save_curves", "train", "train_lm",
]
