"""Writing documents: JSONL (optionally .gz / .zst) or Parquet, atomically: a file appears under its
name only when complete (written as <name>.tmp, renamed on success, removed on failure), so a
crashed run never leaves a half shard that a re-run would take for finished.

Rejected lines go to a JSONL rejects file of {"where", "reason", "raw"} objects.
"""

from __future__ import annotations

import gzip
import json
import os
from dataclasses import asdict
from pathlib import Path
from typing import IO, Any

from qwen2.data.readers import DataError, Document, Reject

PARQUET_BATCH = 1024


def document_record(doc: Document) -> dict[str, Any]:
    """The JSON object of a document (docs/FORMATS.md): empty optional fields left out."""
    record: dict[str, Any] = {"id": doc.id, "text": doc.text}
    for key in ("lang", "domain", "source"):
        if getattr(doc, key) is not None:
            record[key] = getattr(doc, key)
    if doc.meta:
        record["meta"] = doc.meta
    return record


class DocumentWriter:
    """`with DocumentWriter(path) as w: w.write(doc)`; the format follows the suffix (.jsonl,
    .jsonl.gz, .jsonl.zst, .parquet)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        name = self.path.name.lower()
        if not name.endswith((".jsonl", ".jsonl.gz", ".jsonl.zst", ".parquet")):
            raise DataError(f"{self.path}: output must be .jsonl, .jsonl.gz, .jsonl.zst or .parquet")
        self.parquet = name.endswith(".parquet")
        self.tmp = self.path.with_name(self.path.name + ".tmp")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.count = 0
        self._rows: list[dict[str, Any]] = []
        self._parquet_writer = None
        self._file: IO[bytes] | None = None
        if not self.parquet:
            if name.endswith(".gz"):
                self._file = gzip.open(self.tmp, "wb", compresslevel=6)
            elif name.endswith(".zst"):
                import zstandard

                self._file = zstandard.open(self.tmp, "wb")
            else:
                self._file = open(self.tmp, "wb")

    def write(self, doc: Document) -> None:
        self.count += 1
        if self.parquet:
            record = document_record(doc)
            self._rows.append({"id": record["id"], "text": record["text"], "lang": doc.lang, "domain": doc.domain,
                               "source": doc.source, "meta": json.dumps(doc.meta, ensure_ascii=False) if doc.meta
                               else None})
            if len(self._rows) >= PARQUET_BATCH:
                self._flush_parquet()
        else:
            self._file.write(json.dumps(document_record(doc), ensure_ascii=False).encode() + b"\n")

    def _flush_parquet(self) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        schema = pa.schema([(name, pa.string()) for name in ("id", "text", "lang", "domain", "source", "meta")])
        if self._parquet_writer is None:
            self._parquet_writer = pq.ParquetWriter(self.tmp, schema, compression="zstd")
        self._parquet_writer.write_table(pa.Table.from_pylist(self._rows, schema=schema))
        self._rows = []

    def close(self) -> None:
        if self.parquet:
            if self._rows or self._parquet_writer is None:
                self._flush_parquet()
            self._parquet_writer.close()
        else:
            self._file.close()
        os.replace(self.tmp, self.path)

    def abort(self) -> None:
        try:
            if self._file is not None:
                self._file.close()
            if self._parquet_writer is not None:
                self._parquet_writer.close()
        finally:
            self.tmp.unlink(missing_ok=True)

    def __enter__(self) -> DocumentWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


class RejectWriter:
    """Rejected lines, one JSON object each; opened lazily (no file when nothing was rejected)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.count = 0
        self._file: IO[str] | None = None

    def __call__(self, reject: Reject) -> None:
        if self._file is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = open(self.path.with_name(self.path.name + ".tmp"), "w", encoding="utf-8")
        self._file.write(json.dumps(asdict(reject), ensure_ascii=False) + "\n")
        self.count += 1

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            os.replace(self._file.name, self.path)
