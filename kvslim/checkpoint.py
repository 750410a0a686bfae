"""The one reader and writer of model directories (kvslim's format and Hugging Face's).

A model directory is ``config.json`` + ``*.safetensors`` (+ tokenizer files and whatever a
command adds). Every command that writes one (``save_pretrained``, ``convert``, ``train``,
``finetune``) goes through :func:`write_model_dir`:

* :func:`check_output` runs before any long work: an existing non-empty output is refused
  unless ``force``; ``force`` replaces only a *model directory* (config.json + safetensors,
  no sub-directory except the ``keep`` ones) and never a source or a parent of one; the
  nearest existing ancestor must be writable and hold the expected bytes;
* the files are written into a hidden sibling ``.NAME.kvslim-partial-ID``, renamed to
  ``.NAME.kvslim-new-ID`` once complete (it carries a stamp file naming ID), then swapped in
  with ``renameat2(RENAME_EXCHANGE)`` where the kernel has it, else with two renames;
* :func:`recover`, run by every reader and writer of that path, finishes an interrupted swap
  (a complete staged directory always wins) and removes what interrupted writes left, saying
  so on stderr. So a kill at any point leaves the old or the new directory complete under its
  name, or complete, hidden and restored by the next command that touches the path.

Files get the permissions of the user's umask, as any other tool's output.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import secrets
import shutil
import signal
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch

FORMAT = "kvslim-1"
STAMP = ".kvslim-write"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
                   "merges.txt", "tokenizer.model", "chat_template.jinja", "generation_config.json")
_STAGES = ("partial", "new", "old")


def _log(msg: str) -> None:
    print(f"[kvslim] {msg}", file=sys.stderr, flush=True)


def _failpoint(stage: str) -> None:
    """Crash here when ``KVSLIM_CRASH_AT`` names ``stage`` (the kill tests of tests/test_checkpoint.py)."""
    if os.environ.get("KVSLIM_CRASH_AT") == stage:
        os.kill(os.getpid(), signal.SIGKILL)


def read_config(path: str | os.PathLike) -> dict:
    """The ``config.json`` of a model directory, with errors that name the file."""
    path = Path(path)
    recover(path)
    if not path.is_dir():
        raise ValueError(f"model directory {os.fspath(path)!r} does not exist" if not path.exists()
                         else f"{os.fspath(path)!r} is not a directory")
    f = path / "config.json"
    if not f.is_file():
        raise ValueError(f"no config.json in {path}")
    return read_json(f)


def read_json(path: str | os.PathLike) -> dict:
    """A JSON object from a file; not UTF-8, not JSON or not an object is an error naming the file."""
    try:
        with open(path, encoding="utf-8") as fh:
            raw = json.load(fh)
    except UnicodeDecodeError as e:
        raise ValueError(f"{os.fspath(path)} is not UTF-8 text: {e}") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{os.fspath(path)} is not valid JSON: {e}") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{os.fspath(path)} must hold a JSON object, got {type(raw).__name__}")
    return raw


def load_tensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Every tensor of the ``*.safetensors`` files of a directory; a bad file is named."""
    from safetensors.torch import load_file

    files = sorted(Path(path).glob("*.safetensors"))
    if not files:
        raise ValueError(f"no .safetensors files in {path}")
    out: dict[str, torch.Tensor] = {}
    for f in files:
        try:
            part = load_file(str(f))
        except Exception as e:  # noqa: BLE001 - safetensors raises several types for bad files
            size = f.stat().st_size
            raise ValueError(f"{f} ({size:,} bytes) is not a readable safetensors file "
                             f"(corrupt or truncated?): {e}") from None
        dup = set(part) & set(out)
        if dup:
            raise ValueError(f"{f} repeats tensors of another file: {sorted(dup)[:3]}")
        out.update(part)
    return out


def is_model_dir(path: str | os.PathLike, *, keep: tuple[str, ...] = ()) -> bool:
    """config.json + at least one safetensors file, and no sub-directory except ``keep`` ones."""
    p = Path(path)
    if not (p / "config.json").is_file() or not any(p.glob("*.safetensors")):
        return False
    return all(not c.is_dir() or c.name in keep for c in p.iterdir())


def _siblings(path: Path) -> list[tuple[str, str, Path]]:
    """(stage, id, dir) of the hidden write directories of ``path``."""
    out = []
    prefix = f".{path.name}.kvslim-"
    if not path.parent.is_dir():
        return out
    for c in path.parent.iterdir():
        if not c.name.startswith(prefix) or not c.is_dir():
            continue
        stage, _, wid = c.name[len(prefix):].partition("-")
        if stage in _STAGES and wid:
            out.append((stage, wid, c))
    return out


def _stamp(d: Path) -> str | None:
    """The write id in a directory's stamp file (first line), or None."""
    try:
        return (d / STAMP).read_text().splitlines()[0].strip()
    except (OSError, IndexError):
        return None


def _stamp_keep(d: Path) -> list[str]:
    """The sub-directories the write of ``d`` carries over from the previous directory (second line)."""
    try:
        lines = (d / STAMP).read_text().splitlines()
        return [k for k in json.loads(lines[1]) if isinstance(k, str) and "/" not in k] if len(lines) > 1 else []
    except (OSError, ValueError):
        return []


def _pid_alive(wid: str) -> bool:
    try:
        pid = int(wid.split("-")[0])
    except ValueError:
        return False
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _size(d: Path) -> int:
    return sum(f.stat().st_size for f in d.rglob("*") if f.is_file())


def recover(path: str | os.PathLike) -> None:
    """Finish or clean up interrupted writes of ``path`` (see the module docstring).

    A staged directory whose stamp names its own id is a complete new checkpoint: it is moved
    into place (replacing the old one). If ``path`` is missing, the newest old copy is
    restored. Every other leftover of a dead writer is removed.
    """
    path = Path(path)
    sib = [s for s in _siblings(path) if not _pid_alive(s[1])]
    if not sib:
        return
    new = sorted((d for stage, wid, d in sib if stage == "new" and _stamp(d) == wid),
                 key=lambda d: d.stat().st_mtime)
    if new:
        d = new[-1]
        if path.exists():
            for k in _stamp_keep(d):  # what the interrupted write meant to carry over
                if (path / k).is_dir() and not (d / k).exists():
                    os.rename(path / k, d / k)
            _swap(d, path)  # d now holds the old directory; removed below
        else:
            os.rename(d, path)
        _log(f"completed an interrupted write of {path} (from {d.name})")
    elif not path.exists():
        old = sorted((d for stage, _, d in sib if stage == "old"), key=lambda d: d.stat().st_mtime)
        if old:
            os.rename(old[-1], path)
            _log(f"restored {path} from {old[-1].name} (a write was interrupted before completing)")
    for _, wid, d in _siblings(path):
        if not _pid_alive(wid):
            mb = _size(d) / 1e6
            shutil.rmtree(d, ignore_errors=True)
            _log(f"removed {d} ({mb:.0f} MB) left by an interrupted write")


def _existing_ancestor(p: Path) -> Path:
    while not p.exists():
        p = p.parent
    return p


def _writable_ancestor(out: Path, path, flag: str) -> Path:
    """The nearest existing ancestor of ``out``'s parent, proven writable with a probe file (root's
    permission bits say nothing, a read-only mount or an immutable directory only shows on a write)."""
    base = _existing_ancestor(out.parent)
    if not base.is_dir():
        raise ValueError(f"{flag} {os.fspath(path)!r}: {base} is a file, not a directory")
    try:
        fd, probe = tempfile.mkstemp(dir=base, prefix=".kvslim-probe-")
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise ValueError(f"cannot write {flag} {os.fspath(path)!r}: {base} is not writable ({e.strerror})") from None
    return base


def check_output(path: str | os.PathLike, *, force: bool = False, sources=(), keep: tuple[str, ...] = (),
                 expected_bytes: int = 0, resume: bool = False, flag: str = "--out") -> Path:
    """Validate an output model directory before any long work; returns it as a Path.

    Args:
        path: the output directory.
        force: allow replacing an existing model directory.
        sources: directories the command reads; the output may be neither one of them nor a
            parent of one.
        keep: sub-directories a model directory of this command may hold (``run`` for training).
        expected_bytes: about what will be written (checked against the free space).
        resume: an existing directory holding ``keep`` work of a previous run (training
            checkpoints) is accepted without ``force``.
        flag: how the error messages name the output.
    """
    out = Path(os.path.abspath(os.fspath(path)))
    recover(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"{flag} {os.fspath(path)!r} is a file, not a directory")
    for src in sources:
        if src is None:
            continue
        s = Path(os.path.abspath(os.fspath(src)))
        if s == out or out in s.parents:
            what = "is" if s == out else "contains"
            raise ValueError(f"{flag} {os.fspath(path)!r} {what} the source {os.fspath(src)!r}: "
                             "writing there would destroy it; choose another directory")
    if out.is_dir() and any(out.iterdir()):
        resumable = resume and all(c.name in keep for c in out.iterdir() if c.is_dir()) and any(
            (out / k).is_dir() for k in keep)
        if not resumable:
            if not force:
                raise ValueError(f"{flag} {os.fspath(path)!r} exists and is not empty; pass --force to replace it "
                                 "(only a model directory can be replaced)")
            if not is_model_dir(out, keep=keep):
                items = sorted(c.name + ("/" if c.is_dir() else "") for c in out.iterdir())
                raise ValueError(
                    f"{flag} {os.fspath(path)!r} is not a model directory (config.json + *.safetensors"
                    + (f", sub-directories {list(keep)} only" if keep else ", no sub-directories")
                    + f"), so --force will not replace it; it holds {items[:6]}"
                    + (" ..." if len(items) > 6 else ""))
    base = _writable_ancestor(out, path, flag)
    free = shutil.disk_usage(base).free
    if expected_bytes and expected_bytes * 1.05 > free:
        raise ValueError(f"{flag} {os.fspath(path)!r} needs about {expected_bytes / 1e9:.2f} GB but "
                         f"{base} has {free / 1e9:.2f} GB free")
    return out


def check_output_file(path: str | os.PathLike, *, flag: str) -> Path:
    """Validate a file a command will write at its end (``--json``, ``--plot``) before the work.

    The path may not be a directory and its nearest existing ancestor must be writable; missing
    parent directories are created when the file is written (:func:`prepare_output_file`).
    """
    out = Path(os.path.abspath(os.fspath(path)))
    if out.is_dir():
        raise ValueError(f"{flag} {os.fspath(path)!r} is a directory, not a file")
    _writable_ancestor(out, path, flag)
    return out


def prepare_output_file(path: str | os.PathLike) -> Path:
    """Create the missing parent directories of a file checked by :func:`check_output_file`."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    return out


_libc = None


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two directories (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
    global _libc
    if os.environ.get("KVSLIM_NO_EXCHANGE") == "1" or not sys.platform.startswith("linux"):
        return False
    if _libc is None:
        try:
            _libc = ctypes.CDLL(None, use_errno=True)
            _libc.renameat2  # noqa: B018 - glibc >= 2.28
        except (OSError, AttributeError):
            _libc = False
    if not _libc:
        return False
    if _libc.renameat2(-100, os.fsencode(a), -100, os.fsencode(b), 2) == 0:  # AT_FDCWD, RENAME_EXCHANGE
        return True
    err = ctypes.get_errno()
    if err in (22, 38, 95):  # EINVAL, ENOSYS, EOPNOTSUPP: this file system cannot
        return False
    raise OSError(err, os.strerror(err), os.fspath(b))


def _swap(staged: Path, path: Path) -> None:
    """Put ``staged`` at ``path``; afterwards ``staged`` holds the previous directory (if any)."""
    if _exchange(staged, path):
        return
    wid = staged.name.rsplit("-", 2)
    old = path.with_name(f".{path.name}.kvslim-old-{wid[-2]}-{wid[-1]}")
    os.rename(path, old)
    _failpoint("moved-old")
    os.rename(staged, path)
    os.rename(old, staged)


def _apply_umask(root: Path) -> None:
    mask = os.umask(0)
    os.umask(mask)
    for p in [root, *root.rglob("*")]:
        with contextlib.suppress(OSError):
            os.chmod(p, (0o777 if p.is_dir() else 0o666) & ~mask)


def _fsync(p: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_model_dir(path: str | os.PathLike, *, tensors: dict[str, torch.Tensor] | None = None,
                    config: dict | Callable[[], dict], tokenizer_from: str | os.PathLike | None = None,
                    files: dict[str, str | bytes] | None = None, keep: tuple[str, ...] = (), force: bool = False,
                    sources=(), check: bool = True, write_files=None, write_weights=None) -> Path:
    """Write a model directory atomically (module docstring).

    Args:
        path: the output directory.
        tensors: the state dict (saved as ``model.safetensors``; tensors must be contiguous CPU).
        config: ``config.json`` contents, or a function returning them, called once the weights
            are written (a streaming writer learns some of them on the way).
        write_weights: instead of ``tensors``, ``fn(staging_dir)`` writing the ``*.safetensors``
            files itself (streaming conversion writes one layer at a time); an exception in it
            leaves nothing behind, as any failure before the swap.
        tokenizer_from: copy these tokenizer files (:data:`TOKENIZER_FILES`) from this directory.
        files: more files, name -> text or bytes.
        keep: sub-directories of an existing ``path`` carried into the new one (``run``).
        force, sources: see :func:`check_output` (run first unless ``check=False``, for a
            caller that checked at its start and has since created ``path`` itself).
        write_files: optional ``fn(staging_dir)`` writing more files (e.g. a tokenizer's).
    """
    from safetensors.torch import save_file

    if (tensors is None) == (write_weights is None):
        raise ValueError("write_model_dir: pass exactly one of tensors and write_weights")
    if check:
        out = check_output(path, force=force, sources=sources, keep=keep)
    else:
        out = Path(os.path.abspath(os.fspath(path)))
        recover(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    wid = f"{os.getpid()}-{secrets.token_hex(4)}"
    partial = out.with_name(f".{out.name}.kvslim-partial-{wid}")
    staged = out.with_name(f".{out.name}.kvslim-new-{wid}")
    partial.mkdir()
    swapped = False
    try:
        if tensors is not None:
            save_file(tensors, os.fspath(partial / "model.safetensors"), metadata={"format": "pt"})
        else:
            write_weights(partial)
            if not any(partial.glob("*.safetensors")):
                raise ValueError("internal: write_weights wrote no .safetensors file")
        _failpoint("partial")
        (partial / "config.json").write_text(json.dumps(config() if callable(config) else config, indent=2))
        if tokenizer_from is not None:
            for name in TOKENIZER_FILES:
                src = Path(tokenizer_from) / name
                if src.is_file():
                    shutil.copyfile(src, partial / name)
        for name, data in (files or {}).items():
            (partial / name).write_bytes(data if isinstance(data, bytes) else data.encode())
        if write_files is not None:
            write_files(partial)
        (partial / STAMP).write_text(wid + "\n" + json.dumps(list(keep)) + "\n")
        _apply_umask(partial)
        for f in partial.iterdir():
            if f.is_file():
                _fsync(f)
        os.rename(partial, staged)
        _fsync(out.parent)
        _failpoint("staged")
        if out.exists():
            for k in keep:
                if (out / k).is_dir():
                    os.rename(out / k, staged / k)
            _failpoint("kept")
            _swap(staged, out)
        else:
            os.rename(staged, out)
        swapped = True
        _failpoint("swapped")
        _fsync(out.parent)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
        if swapped or not staged.exists() or _stamp(staged) != wid:
            shutil.rmtree(staged, ignore_errors=True)  # after the swap: the previous directory
        elif out.exists():
            for k in keep:  # failed before the swap: give back what was carried over
                if (staged / k).is_dir() and not (out / k).exists():
                    os.rename(staged / k, out / k)
            shutil.rmtree(staged, ignore_errors=True)
    return out


def state_dict_for_save(model, dtype: torch.dtype | None = None, *, state: dict | None = None) -> dict[str, torch.Tensor]:
    """Contiguous CPU tensors of ``model.state_dict()``, or of ``state`` (an already gathered full state
    dict of a sharded model), tied ``lm_head`` left out."""
    state = model.state_dict() if state is None else state
    sd = {k: v.detach().to(dtype or v.dtype).contiguous().cpu() for k, v in state.items()}
    if getattr(model.config, "tie_word_embeddings", False):
        sd.pop("lm_head.weight", None)
    return sd
