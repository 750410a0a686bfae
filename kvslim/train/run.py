"""The two commands' library calls: ``train_lm`` (a new model from a spec) and ``finetune``.

Both resolve the data and tokenizer, run :func:`kvslim.train.loop.train` with checkpoints in
``OUT/run``, and write the final model directory through :mod:`kvslim.checkpoint` (so an
existing ``--out`` is replaced only with ``force``, only if it is a model directory, never the
source, and atomically).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from kvslim.checkpoint import FORMAT, check_output, read_config, state_dict_for_save, write_model_dir
from kvslim.eval.tokenizer import save_tokenizer
from kvslim.eval.tokenizer import vocab_size as tok_vocab
from kvslim.model import ModelConfig, Transformer, load_model
from kvslim.spec import AttentionSpec
from kvslim.train import dist
from kvslim.train.config import TrainConfig
from kvslim.train.curves import save_curves
from kvslim.train.loop import CHECKPOINT, train

RUN_DIR = "run"


def build_model(
    spec: AttentionSpec,
    *,
    vocab_size: int,
    num_layers: int,
    intermediate_size: int | None = None,
    tie_word_embeddings: bool = True,
    max_position_embeddings: int = 4096,
    seed: int = 0,
) -> Transformer:
    """A freshly initialised Transformer (intermediate size default: 8/3 width, rounded up to 64)."""
    d = spec.hidden_size
    if intermediate_size is None:
        intermediate_size = -(-8 * d // 3 // 64) * 64
    cfg = ModelConfig(
        vocab_size=vocab_size,
        hidden_size=d,
        intermediate_size=intermediate_size,
        num_layers=num_layers,
        attention=spec,
        tie_word_embeddings=tie_word_embeddings,
        max_position_embeddings=max_position_embeddings,
    )
    torch.manual_seed(seed)
    return Transformer(cfg)


def _texts_and_tokenizer(text, val_text, tokenizer, *, tokenizer_dirs=()):
    """Resolve the tokenizer (training a BPE on the training text if asked) and both streams."""
    from kvslim.eval.mixture import is_mixture, mixture_text, mixture_tokens
    from kvslim.eval.tokenizer import has_tokenizer, resolve_tokenizer
    from kvslim.eval.tokens import TOKEN_SUFFIXES, load_tokens, source_text

    mix = is_mixture(text)
    is_ids = not mix and (isinstance(text, torch.Tensor) or Path(os.fspath(text)).suffix in TOKEN_SUFFIXES)
    tok = None
    if tokenizer is None:
        for d in tokenizer_dirs:
            if d is not None and has_tokenizer(d):
                tok = resolve_tokenizer(os.fspath(d))
                break
    elif isinstance(tokenizer, str) and tokenizer.startswith("bpe-") and not os.path.exists(tokenizer):
        if is_ids:
            raise ValueError(
                f"tokenizer {tokenizer!r} is trained on text, but the training data is token ids"
            )
        tok = resolve_tokenizer(tokenizer, train_text=mixture_text(text) if mix else
                                source_text(text, default_split="calib"))
    else:
        tok = resolve_tokenizer(tokenizer)
    if tok is None and not (
        is_ids
        and (
            val_text is None
            or isinstance(val_text, torch.Tensor)
            or Path(os.fspath(val_text)).suffix in TOKEN_SUFFIXES
        )
    ):
        raise ValueError("text data needs a tokenizer: pass --tokenizer (bpe-N, smollm2 or a directory)")
    train_ids = mixture_tokens(text, tok) if mix else load_tokens(text, tokenizer=tok, default_split="calib")
    val_ids = None if val_text is None else load_tokens(val_text, tokenizer=tok, default_split="eval")
    return tok, train_ids, val_ids


def _output(out, *, force: bool, resume: bool, sources=()) -> Path | None:
    """Check ``out`` before any work: a training run's own ``out/run`` may be resumed; anything else
    non-empty needs ``force`` and must be a model directory (``kvslim.checkpoint.check_output``)."""
    if out is None:
        return None
    resumable = resume and (Path(out) / RUN_DIR / CHECKPOINT).is_file()
    return check_output(out, force=force, sources=sources, keep=(RUN_DIR,), resume=resumable)


def _finish(model: Transformer, out: Path | None, tok, history: dict, cfg: TrainConfig, launch: dist.Launch) -> None:
    """Write the final model directory (weights, config, tokenizer, logs; ``run/`` carried over).

    Under FSDP every rank gathers the full weights to rank 0, which writes; all return together
    (or all raise rank 0's error)."""
    if out is None:
        return
    state = dist.full_model_state(model, launch)

    def extra(d: Path) -> None:
        if tok is not None:
            save_tokenizer(tok, d)
        save_curves(history, d)

    def write() -> None:
        write_model_dir(out, tensors=state_dict_for_save(model, state=state),
                        config={"format": FORMAT, **model.config.to_dict()},
                        files={"train_config.json": json.dumps(cfg.to_dict(), indent=2),
                               "history.json": json.dumps(history, indent=1)},
                        write_files=extra, keep=(RUN_DIR,), check=False)

    dist.on_rank0(write, launch, share=False)


def _run_dir(out: Path | None) -> Path | None:
    """Checkpoints and logs live in ``out/run`` so that ``out`` itself is a clean model dir."""
    return None if out is None else out / RUN_DIR


def train_lm(
    *,
    spec: AttentionSpec,
    text,
    out: str | os.PathLike | None,
    val_text=None,
    tokenizer="bpe-8192",
    num_layers: int = 6,
    intermediate_size: int | None = None,
    vocab_size: int | None = None,
    tie_word_embeddings: bool = True,
    init_seed: int | None = None,
    resume: bool = True,
    force: bool = False,
    progress: bool = True,
    **train_kw,
) -> tuple[Transformer, dict]:
    """Train a new model from a spec on a text or token source (the ``kvslim train`` command).

    Args:
        spec: the attention spec (fixes the width, heads and variant).
        text: training source (corpus name, text file, .npy/.bin ids; see `kvslim.eval.tokens`).
            A bare corpus name means its non-held-out part (``sotu`` = ``sotu:calib``).
        out: output dir: the final model (config.json, model.safetensors, tokenizer files,
            train_log.csv, curves.png); checkpoints in ``out/run``.
        val_text: validation source (a bare corpus name means its held-out part).
        tokenizer: ``bpe-N``, ``smollm2``, a dir or tokenizer.json; None for token-id files.
        num_layers, intermediate_size, vocab_size, tie_word_embeddings: model shape
            (vocab_size default: the tokenizer's, else max id + 1).
        init_seed: parameter-init seed (default: the TrainConfig seed).
        resume: continue from ``out/run/checkpoint.pt`` if there is one.
        force: replace an existing model directory at ``out``.
        **train_kw: TrainConfig fields (steps, lr, batch_size, seq_len, ...).
    """
    cfg = TrainConfig(**train_kw)
    launch = dist.setup(cfg)  # torchrun: validate the launch, start the process group
    out_p = dist.on_rank0(lambda: _output(out, force=force, resume=resume), launch)
    tok, train_ids, val_ids = dist.rank0_first(lambda: _texts_and_tokenizer(text, val_text, tokenizer), launch)
    if vocab_size is None:
        vocab_size = tok_vocab(tok) if tok is not None else int(train_ids.max()) + 1
    model = build_model(
        spec,
        vocab_size=vocab_size,
        num_layers=num_layers,
        intermediate_size=intermediate_size,
        tie_word_embeddings=tie_word_embeddings,
        seed=cfg.seed if init_seed is None else init_seed,
    )
    history = train(
        model,
        train_ids,
        config=cfg,
        val_tokens=val_ids,
        out_dir=_run_dir(out_p),
        resume=resume,
        progress=progress,
    )
    _finish(model, out_p, tok, history, cfg, launch)
    return model, history


def finetune(
    *,
    model,
    text,
    out: str | os.PathLike | None = None,
    teacher=None,
    val_text=None,
    tokenizer=None,
    loss: str | None = None,
    resume: bool = True,
    force: bool = False,
    progress: bool = True,
    **train_kw,
) -> tuple[Transformer, dict]:
    """Recover a converted model's quality: distil from `teacher` (or plain LM loss) on a text source.

    Args:
        model: the student (a Transformer or a model directory, kvslim or Hugging Face format).
        teacher: the original model (Transformer or directory); None = plain LM fine-tuning.
        text, val_text: training / validation sources (see `train_lm`).
        tokenizer: default: the student's directory tokenizer, else the teacher's.
        loss: ``distill`` (default when a teacher is given) or ``lm``.
        out: output model directory (checkpoints in ``out/run``); None = keep in memory only.
            Never the student's or the teacher's directory.
        resume, force: as in :func:`train_lm`.
        **train_kw: TrainConfig fields (steps, lr, seq_len, batch_size, temperature, top_k,
            lm_weight, attention_only, ...); defaults lr=1e-4, steps=200, warmup 10 %.
    Returns (student, history); the history's ``val`` rows carry ``kl`` to the teacher.

    Under ``torchrun`` it trains data-parallel with FSDP2 (``kvslim.train.dist``): ``batch_size``
    is the global batch (divisible by the world size), rank 0 writes ``out``, and the returned
    student is the sharded module (its forward is collective); the full weights are in ``out``.
    """
    loss = loss or ("distill" if teacher is not None else "lm")
    train_kw.setdefault("lr", 1e-4)
    train_kw.setdefault("steps", 200)
    cfg = TrainConfig(loss=loss, **train_kw)
    if loss == "distill" and teacher is None:
        raise ValueError("loss 'distill' needs a teacher (--teacher)")
    dirs = [m for m in (model, teacher) if not isinstance(m, Transformer) and m is not None]
    for d, what in ((model, "--model"), (teacher, "--teacher")):
        if d is not None and not isinstance(d, Transformer):
            _check_model_dir(d, what)
    launch = dist.setup(cfg)  # torchrun: validate the launch, start the process group
    out_p = dist.on_rank0(lambda: _output(out, force=force, resume=resume, sources=dirs), launch)
    tok, train_ids, val_ids = dist.rank0_first(
        lambda: _texts_and_tokenizer(text, val_text, tokenizer, tokenizer_dirs=dirs), launch)
    student = load_model(model, what="model (student)", device=launch.device)
    teach = load_model(teacher, what="teacher", device=launch.device) if teacher is not None else None
    history = train(
        student,
        train_ids,
        config=cfg,
        val_tokens=val_ids,
        teacher=teach,
        out_dir=_run_dir(out_p),
        resume=resume,
        eval_at_start=True,
        progress=progress,
    )
    _finish(student, out_p, tok, history, cfg, launch)
    return student, history


def _check_model_dir(path, what: str) -> None:
    """Fail early, naming the flag, when ``path`` is not a readable model directory."""
    p = os.fspath(path)
    if not os.path.exists(p):
        raise ValueError(f"{what} {p!r} does not exist")
    if not os.path.isdir(p):
        raise ValueError(f"{what} {p!r} is not a directory")
    read_config(p)
