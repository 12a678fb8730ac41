"""Documents from files: plain text and JSONL (the `documents` format of docs/FORMATS.md).

A `.txt` file is one document. A `.jsonl` file (optionally `.gz`) holds one JSON object per line
with at least a string "text"; "id", "lang", "domain", "source" and "meta" are kept when present.
Bad input stops with a DataError naming the file and line (invalid UTF-8, a line that is not JSON, a
missing or non-string "text"): a corpus with silently dropped lines would be a different corpus.
"""

from __future__ import annotations

import gzip
import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

TEXT_SUFFIXES = (".txt", ".md")
JSONL_SUFFIXES = (".jsonl", ".jsonl.gz")


class DataError(ValueError):
    """Input data that cannot be read as documents; the message names the file and line."""


@dataclass(frozen=True)
class Document:
    id: str
    text: str
    lang: str | None = None
    domain: str | None = None
    source: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)


def iter_documents(paths: Iterable[str | Path]) -> Iterator[Document]:
    """Every document of every file, in order. Directories are read recursively (sorted), taking
    the files with a known suffix."""
    for path in expand_paths(paths):
        yield from read_file(path)


def expand_paths(paths: Iterable[str | Path]) -> list[Path]:
    out: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and _kind(p) is not None)
            if not found:
                raise DataError(f"{path}: no .txt, .md, .jsonl or .jsonl.gz files in this directory")
            out.extend(found)
        elif path.is_file():
            if _kind(path) is None:
                raise DataError(f"{path}: unknown file type (expected .txt, .md, .jsonl or .jsonl.gz)")
            out.append(path)
        else:
            raise DataError(f"{path}: no such file or directory")
    return out


def _kind(path: Path) -> str | None:
    name = path.name.lower()
    if name.endswith(JSONL_SUFFIXES):
        return "jsonl"
    return "text" if name.endswith(TEXT_SUFFIXES) else None


def read_file(path: Path) -> Iterator[Document]:
    if _kind(path) == "text":
        try:
            text = path.read_bytes().decode("utf-8")
        except UnicodeDecodeError as e:
            raise DataError(f"{path}: invalid UTF-8 at byte {e.start}") from None
        yield Document(id=str(path), text=text, source=str(path))
        return
    for where, obj in iter_jsonl(path):
        yield _document(obj, where)


def iter_jsonl(path: Path) -> Iterator[tuple[str, dict]]:
    """("file:line", object) for each non-blank line of a .jsonl[.gz] file; anything else is a
    DataError naming the line (invalid UTF-8, not JSON, not an object)."""
    opener = gzip.open if path.name.lower().endswith(".gz") else open
    try:
        raw = opener(path, "rb")
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror})") from None
    with raw:
        for number, line in enumerate(raw, 1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                obj = json.loads(line.decode("utf-8"))
            except UnicodeDecodeError as e:
                raise DataError(f"{where}: invalid UTF-8 at byte {e.start} of the line") from None
            except json.JSONDecodeError as e:
                raise DataError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(obj, dict):
                raise DataError(f"{where}: expected a JSON object, got {type(obj).__name__}")
            yield where, obj


def _document(obj: Any, where: str) -> Document:
    if not isinstance(obj, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    text = obj.get("text")
    if not isinstance(text, str):
        raise DataError(f"{where}: field 'text' must be a string, got {type(text).__name__}")
    for key in ("id", "lang", "domain", "source"):
        if obj.get(key) is not None and not isinstance(obj[key], (str, int)):
            raise DataError(f"{where}: field {key!r} must be a string, got {type(obj[key]).__name__}")
    meta = obj.get("meta") or {}
    if not isinstance(meta, dict):
        raise DataError(f"{where}: field 'meta' must be an object, got {type(meta).__name__}")
    return Document(id=str(obj.get("id", where)), text=text, lang=_opt(obj.get("lang")),
                    domain=_opt(obj.get("domain")), source=_opt(obj.get("source")), meta=meta)


def _opt(value: Any) -> str | None:
    return None if value is None else str(value)
