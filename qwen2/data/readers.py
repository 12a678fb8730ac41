"""Documents from files: plain text, JSONL and Parquet (the `documents` format of docs/FORMATS.md).

A `.txt` / `.md` file is one document. A `.jsonl` file holds one JSON object per line with at least
a string "text"; "id", "lang", "domain", "source" and "meta" are kept when present. A `.parquet`
file holds the same fields as columns (a row per document; "meta" a JSON string or a struct).
Text and JSONL files may be compressed (`.gz`, `.zst`).

Bad input (invalid UTF-8, a line that is not JSON, a missing or non-string "text") stops with a
DataError naming the file and line: a corpus with silently dropped lines would be a different
corpus. The data pipeline passes `on_error` instead: each bad line or row goes there as a Reject
(where, why, the raw line) to be written to a rejects file, and reading goes on.
"""

from __future__ import annotations

import gzip
import io
import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Callable

TEXT_SUFFIXES = tuple(s + c for s in (".txt", ".md") for c in ("", ".gz", ".zst"))
JSONL_SUFFIXES = (".jsonl", ".jsonl.gz", ".jsonl.zst")
PARQUET_SUFFIXES = (".parquet",)


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


@dataclass(frozen=True)
class Reject:
    """A line or row that is not a document: where ("file:line"), why, and what it held."""

    where: str
    reason: str
    raw: str  # the line as read (invalid bytes escaped), at most RAW_LIMIT characters

    RAW_LIMIT = 10_000


OnError = Callable[[Reject], None]


def iter_documents(paths: Iterable[str | Path], *, on_error: OnError | None = None) -> Iterator[Document]:
    """Every document of every file, in order. Directories are read recursively (sorted), taking
    the files with a known suffix."""
    for path in expand_paths(paths):
        yield from read_file(path, on_error=on_error)


def expand_paths(paths: Iterable[str | Path]) -> list[Path]:
    out: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and _kind(p) is not None)
            if not found:
                raise DataError(f"{path}: no .txt, .md, .jsonl or .parquet files (optionally .gz / .zst) in this "
                                f"directory")
            out.extend(found)
        elif path.is_file():
            if _kind(path) is None:
                raise DataError(f"{path}: unknown file type (expected .txt, .md, .jsonl or .parquet, text and JSONL "
                                f"optionally .gz / .zst)")
            out.append(path)
        else:
            raise DataError(f"{path}: no such file or directory")
    return out


def _kind(path: Path) -> str | None:
    name = path.name.lower()
    if name.endswith(JSONL_SUFFIXES):
        return "jsonl"
    if name.endswith(PARQUET_SUFFIXES):
        return "parquet"
    return "text" if name.endswith(TEXT_SUFFIXES) else None


def open_binary(path: Path) -> IO[bytes]:
    """A file for reading, decompressed by its suffix (.gz, .zst)."""
    name = path.name.lower()
    try:
        if name.endswith(".gz"):
            return gzip.open(path, "rb")
        if name.endswith(".zst"):
            import zstandard

            return io.BufferedReader(zstandard.open(path, "rb"))  # its reader has no readline
        return open(path, "rb")
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror})") from None


def read_file(path: Path, *, on_error: OnError | None = None) -> Iterator[Document]:
    kind = _kind(path)
    if kind == "text":
        yield from read_text_file(path, on_error=on_error)
    elif kind == "parquet":
        yield from _read_parquet(path, on_error)
    else:
        for where, obj in iter_jsonl(path, on_error=on_error):
            try:
                yield _document(obj, where)
            except DataError as e:
                _bad(on_error, where, str(e).removeprefix(f"{where}: "), json.dumps(obj, ensure_ascii=False).encode())


def read_text_file(path: Path, *, on_error: OnError | None = None) -> Iterator[Document]:
    """The whole file as one document (whatever its suffix; .gz / .zst decompressed)."""
    try:
        with open_binary(path) as f:
            raw = f.read()
    except (OSError, EOFError) as e:
        raise DataError(f"{path}: cannot read ({e})") from None
    try:
        yield Document(id=str(path), text=raw.decode("utf-8"), source=str(path))
    except UnicodeDecodeError as e:
        _bad(on_error, str(path), f"invalid UTF-8 at byte {e.start}", raw)


def _bad(on_error: OnError | None, where: str, reason: str, raw: bytes) -> None:
    if on_error is None:
        raise DataError(f"{where}: {reason}")
    on_error(Reject(where, reason, raw.decode("utf-8", errors="backslashreplace")[:Reject.RAW_LIMIT]))


def iter_jsonl(path: Path, *, on_error: OnError | None = None) -> Iterator[tuple[str, dict]]:
    """("file:line", object) for each non-blank line of a .jsonl[.gz|.zst] file; anything else
    (invalid UTF-8, not JSON, not an object) is a DataError naming the line, or with `on_error`
    a Reject passed there and skipped."""
    with open_binary(path) as raw:
        try:
            for number, line in enumerate(raw, 1):
                if not line.strip():
                    continue
                where = f"{path}:{number}"
                try:
                    obj = json.loads(line.decode("utf-8"))
                except UnicodeDecodeError as e:
                    _bad(on_error, where, f"invalid UTF-8 at byte {e.start} of the line", line)
                    continue
                except json.JSONDecodeError as e:
                    _bad(on_error, where, f"not valid JSON ({e.msg} at column {e.colno})", line)
                    continue
                if not isinstance(obj, dict):
                    _bad(on_error, where, f"expected a JSON object, got {type(obj).__name__}", line)
                    continue
                yield where, obj
        except (OSError, EOFError) as e:  # a truncated or corrupt .gz / .zst
            raise DataError(f"{path}: cannot decompress ({e})") from None


def _read_parquet(path: Path, on_error: OnError | None) -> Iterator[Document]:
    import pyarrow.parquet as pq

    try:
        table = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises its own ArrowInvalid / OSError for non-Parquet bytes
        raise DataError(f"{path}: not a readable Parquet file ({e})") from None
    if "text" not in table.schema_arrow.names:
        raise DataError(f"{path}: no 'text' column (columns: {table.schema_arrow.names})")
    row = 0
    for batch in table.iter_batches(batch_size=1024):
        for obj in batch.to_pylist():
            row += 1
            where = f"{path}:{row}"
            meta = obj.get("meta")
            if isinstance(meta, str):
                try:
                    obj["meta"] = json.loads(meta)
                except json.JSONDecodeError:
                    _bad(on_error, where, "column 'meta' is not a JSON object", meta.encode())
                    continue
            try:
                yield _document(obj, where)
            except DataError as e:
                _bad(on_error, where, str(e).removeprefix(f"{where}: "),
                     json.dumps(obj, ensure_ascii=False, default=str).encode())


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
    return Document(id=str(obj["id"]) if obj.get("id") is not None else where, text=text, lang=_opt(obj.get("lang")),
                    domain=_opt(obj.get("domain")), source=_opt(obj.get("source")), meta=meta)


def _opt(value: Any) -> str | None:
    return None if value is None else str(value)
