"""Text genres found on this machine: Python code, a language reference, licenses, package docs.

The three downloaded corpora (data.py) are all literary or political prose. To calibrate on a
mixture of genres *and* still evaluate on genres the calibration never saw, four more come
from the running interpreter and the packages installed next to it (nothing is downloaded):

| name     | documents                                                        | genre          |
|----------|------------------------------------------------------------------|----------------|
| `code`   | top-level ``*.py`` modules of the interpreter's standard library | Python source  |
| `pyref`  | the topics of ``pydoc_data.topics`` (the Python language reference) | technical prose |
| `legal`  | LICENSE / COPYING / NOTICE files of the installed distributions and CPython's ``LICENSE.txt`` | legal prose |
| `docs`   | long descriptions (``METADATA`` bodies) of the installed distributions but kvslim | READMEs (markdown) |

Each genre is split by document: a document is *evaluation* when ``crc32(doc_id) % 4 == 0``,
calibration otherwise, so the split is deterministic, independent of document order and
stable when other documents come or go. ``code`` excludes ``pydoc_data`` (it is ``pyref``).
Documents with identical text (the same license shipped twice) are kept once. What a genre
holds depends on the interpreter and the installed packages; :func:`describe` gives the
document count and a SHA-256 of the text so reports can say exactly what was scored.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import re
import sysconfig
import zlib
from functools import cache
from pathlib import Path

__all__ = ["LOCAL_GENRES", "describe", "local_documents", "local_split"]

LOCAL_GENRES = ("code", "pyref", "legal", "docs")
DOC_SEP = "\n\n"
LICENSE_RE = re.compile(r"^(LICEN[CS]E|COPYING|NOTICE)", re.IGNORECASE)


def _code() -> dict[str, str]:
    root = Path(sysconfig.get_paths()["stdlib"])
    docs = {}
    for p in sorted(root.glob("*.py")):
        try:
            docs[p.name] = p.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
    return docs


def _pyref() -> dict[str, str]:
    from pydoc_data.topics import topics

    return {k: topics[k] for k in sorted(topics)}


def _legal() -> dict[str, str]:
    docs = {}
    cpython = Path(sysconfig.get_paths()["stdlib"]) / "LICENSE.txt"
    if cpython.is_file():
        docs["cpython/LICENSE.txt"] = cpython.read_text(encoding="utf-8", errors="replace")
    for dist in importlib.metadata.distributions():
        name = dist.metadata["Name"] or "?"
        for f in dist.files or []:
            if LICENSE_RE.match(f.name) and f.suffix.lower() in ("", ".txt", ".md", ".rst"):
                try:
                    docs[f"{name}/{f}"] = f.read_text(encoding="utf-8")
                except (UnicodeDecodeError, OSError):
                    continue
    return docs


def _docs() -> dict[str, str]:
    docs = {}
    for dist in importlib.metadata.distributions():
        meta = dist.read_text("METADATA") or ""
        head, sep, body = meta.partition("\n\n")
        if sep and body.strip() and (dist.metadata["Name"] or "").lower() != "kvslim":  # not our own README
            docs[dist.metadata["Name"] or head[:40]] = body
    return docs


@cache
def local_documents(name: str) -> dict[str, str]:
    """``{doc_id: text}`` of one local genre, sorted by id, duplicates and empty texts dropped."""
    if name not in LOCAL_GENRES:
        raise ValueError(f"local genre must be one of {LOCAL_GENRES}, got {name!r}")
    raw = {"code": _code, "pyref": _pyref, "legal": _legal, "docs": _docs}[name]()
    seen, docs = set(), {}
    for k in sorted(raw):
        text = raw[k].replace("\r\n", "\n").strip()
        h = hashlib.sha256(text.encode()).digest()
        if text and h not in seen:
            seen.add(h)
            docs[k] = text
    if not docs:
        raise RuntimeError(f"local genre {name!r} has no documents on this machine")
    return docs


def _is_eval(doc_id: str) -> bool:
    return zlib.crc32(doc_id.encode()) % 4 == 0


def local_split(name: str) -> dict[str, str]:
    """Document-disjoint ``{"calib": str, "eval": str}`` of a local genre (eval: crc32(id) % 4 == 0)."""
    docs = local_documents(name)
    parts = {"calib": [t for k, t in docs.items() if not _is_eval(k)], "eval": [t for k, t in docs.items() if _is_eval(k)]}
    for part, texts in parts.items():
        if not texts:
            raise RuntimeError(f"local genre {name!r} has no {part} documents on this machine")
    return {part: DOC_SEP.join(texts) for part, texts in parts.items()}


def describe(name: str, split: str) -> dict:
    """What one split of a local genre holds: document ids, characters, SHA-256 (for reports)."""
    docs = local_documents(name)
    ids = [k for k in docs if _is_eval(k) == (split == "eval")]
    text = local_split(name)[split]
    return {"genre": name, "split": split, "documents": len(ids), "chars": len(text),
            "sha256": hashlib.sha256(text.encode()).hexdigest()[:16], "first_ids": ids[:5]}
