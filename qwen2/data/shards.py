"""Token shards: what pre-training reads (format in docs/FORMATS.md).

A shard is three files with one stem: `<stem>.bin` (the tokens, flat little-endian uint32),
`<stem>.idx` (where each document starts, little-endian uint64 offsets into .bin) and `<stem>.json`
(the sidecar: counts, the tokenizer's fingerprint, eos id, sources). Every document ends with the
end-of-text id (document_end_id), so documents can be concatenated and packed into training sequences
while the offsets still say where each one begins (document-aware attention restarts there).

The sidecar is written last, after .bin and .idx are complete and renamed into place: a shard
without one is an interrupted write and is never read. Opening checks the sizes against the
sidecar before mapping anything, so a truncated or foreign file is a DataError naming it.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from qwen2.atomic import atomic_write_text
from qwen2.data.readers import DataError, Document

FORMAT, VERSION = "qwen2-token-shard", 1
TOKEN_DTYPE = np.dtype("<u4")
OFFSET_DTYPE = np.dtype("<u8")
DEFAULT_SHARD_TOKENS = 1 << 28  # 1 GiB of tokens per shard


@dataclass
class TokenShard:
    """One shard, memory-mapped read-only: `tokens[i]`, and `doc_starts` (sorted, first 0)."""

    path: Path  # the sidecar
    tokens: np.ndarray
    doc_starts: np.ndarray
    meta: dict

    @property
    def num_tokens(self) -> int:
        return len(self.tokens)

    @classmethod
    def open(cls, sidecar: str | Path, *, fingerprint: str | None = None) -> TokenShard:
        path = Path(sidecar)
        try:
            meta = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise DataError(f"{path}: not a readable shard sidecar ({e})") from None
        if not isinstance(meta, dict) or meta.get("format") != FORMAT or meta.get("version") != VERSION:
            raise DataError(f"{path}: not a {FORMAT} v{VERSION} sidecar")
        n_tokens, n_docs = meta.get("tokens"), meta.get("documents")
        if not (isinstance(n_tokens, int) and isinstance(n_docs, int) and 0 < n_docs <= n_tokens):
            raise DataError(f"{path}: invalid counts tokens={n_tokens!r} documents={n_docs!r}")
        if fingerprint is not None and meta.get("tokenizer") != fingerprint:
            raise DataError(f"{path}: tokenized with a different tokenizer (fingerprint {str(meta.get('tokenizer'))[:12]}"
                            f"..., the model's is {fingerprint[:12]}...); re-run `qwen2 data pack`")
        stem = path.with_suffix("")
        bin_path, idx_path = stem.with_suffix(".bin"), stem.with_suffix(".idx")
        for file, count, dtype in ((bin_path, n_tokens, TOKEN_DTYPE), (idx_path, n_docs, OFFSET_DTYPE)):
            size = file.stat().st_size if file.is_file() else None
            if size != count * dtype.itemsize:
                raise DataError(f"{file}: expected {count * dtype.itemsize} bytes from {path.name}, "
                                f"found {'no file' if size is None else size} (truncated or from another shard?)")
        tokens = np.memmap(bin_path, dtype=TOKEN_DTYPE, mode="r")
        doc_starts = np.fromfile(idx_path, dtype=OFFSET_DTYPE)
        if doc_starts[0] != 0 or np.any(np.diff(doc_starts.astype(np.int64)) <= 0) or doc_starts[-1] >= n_tokens:
            raise DataError(f"{idx_path}: document offsets are not increasing from 0 within {n_tokens} tokens")
        vocab = meta.get("vocab_size")
        if isinstance(vocab, int) and n_tokens and int(tokens.max()) >= vocab:
            raise DataError(f"{bin_path}: token id {int(tokens.max())} is outside the vocabulary ({vocab})")
        return cls(path, tokens, doc_starts, meta)


def find_shards(location: str | Path) -> list[Path]:
    """Sidecars of the shards in a directory (sorted), or the one sidecar given, or a glob
    (e.g. "data/train/modern-*.json")."""
    path = Path(location)
    if path.is_dir():
        found = sorted(path.glob("*.json"))
    elif path.suffix == ".json" and path.is_file():
        found = [path]
    else:
        found = sorted(Path(path.parent).glob(path.name)) if any(c in path.name for c in "*?[") else []
    found = [p for p in found if p.with_suffix(".bin").exists()]
    if not found:
        raise DataError(f"{location}: no token shards (a <name>.json sidecar next to <name>.bin); "
                        f"write them with `qwen2 data pack`")
    return found


@dataclass
class ShardWriter:
    """Appends tokenized documents (each followed by eos) to shards `<directory>/<name>-00000.*`."""

    directory: Path
    name: str
    fingerprint: str
    vocab_size: int
    eos_id: int
    shard_tokens: int = DEFAULT_SHARD_TOKENS
    written: list[Path] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.directory = Path(self.directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self._buffer: list[np.ndarray] = []
        self._starts: list[int] = []
        self._size = 0
        self._sources: Counter[str] = Counter()

    def add(self, ids: list[int], source: str = "") -> None:
        if self._size and self._size + len(ids) + 1 > self.shard_tokens:
            self.flush()
        self._starts.append(self._size)
        self._buffer.append(np.asarray(ids + [self.eos_id], dtype=TOKEN_DTYPE))
        self._size += len(ids) + 1
        self._sources[source] += 1

    def flush(self) -> None:
        if not self._size:
            return
        stem = self.directory / f"{self.name}-{len(self.written):05d}"
        for suffix, array in ((".bin", np.concatenate(self._buffer)), (".idx", np.asarray(self._starts, OFFSET_DTYPE))):
            tmp = stem.with_suffix(suffix + ".tmp")
            with open(tmp, "wb") as f:
                f.write(array.tobytes())
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, stem.with_suffix(suffix))
        meta = {"format": FORMAT, "version": VERSION, "tokens": self._size, "documents": len(self._starts),
                "dtype": "uint32", "tokenizer": self.fingerprint, "vocab_size": self.vocab_size,
                "eos_id": self.eos_id, "sources": dict(self._sources)}
        atomic_write_text(stem.with_suffix(".json"), json.dumps(meta, indent=1) + "\n")
        self.written.append(stem.with_suffix(".json"))
        self._buffer, self._starts, self._size, self._sources = [], [], 0, Counter()


def document_end_id(tokenizer) -> int:
    """The id that closes every document: <|endoftext|> (what Qwen2 pre-trains with; an instruct
    tokenizer's eos is <|im_end|> instead), else the tokenizer's eos."""
    end_id = tokenizer.token_to_id("<|endoftext|>")
    if end_id is None:
        end_id = tokenizer.eos_token_id
    if end_id is None:
        raise ValueError("the tokenizer has no end-of-text token to close documents with")
    return end_id


def split_of(document: Document, val_fraction: float) -> str:
    """'val' or 'train' from a hash of the document's id: stable across runs and machines, and
    documents sharing an id (e.g. two editions of one play) always land on the same side."""
    if val_fraction <= 0:
        return "train"
    digest = hashlib.sha256(document.id.encode("utf-8")).digest()
    return "val" if int.from_bytes(digest[:8], "little") / 2 ** 64 < val_fraction else "train"


def pack_documents(documents: Iterable[Document], tokenizer, out: str | Path, *, name: str = "shard",
                   val_fraction: float = 0.0, shard_tokens: int = DEFAULT_SHARD_TOKENS,
                   batch_documents: int = 256, progress: bool = False) -> dict[str, list[Path]]:
    """Tokenize documents (in parallel batches) into `<out>/train/` and, with a validation
    fraction, `<out>/val/` shards. Returns the sidecars written per split."""
    from tqdm import tqdm

    if not 0 <= val_fraction < 1:
        raise ValueError(f"val_fraction must be in [0, 1) (got {val_fraction})")
    end_id = document_end_id(tokenizer)
    writers = {split: ShardWriter(Path(out) / split, name, tokenizer.fingerprint, tokenizer.vocab_size, end_id,
                                  shard_tokens) for split in ("train", "val")}
    bar = tqdm(desc="tokenizing", unit=" docs", disable=not progress)
    batch: list[Document] = []

    def write(batch: list[Document]) -> None:
        for document, ids in zip(batch, tokenizer.encode_batch([d.text for d in batch])):
            writers[split_of(document, val_fraction)].add(ids, document.source or "")
        bar.update(len(batch))

    for document in documents:
        batch.append(document)
        if len(batch) == batch_documents:
            write(batch)
            batch = []
    write(batch)
    bar.close()
    for writer in writers.values():
        writer.flush()
    if not writers["train"].written:
        raise DataError("no training documents were written (empty input, or every document went to validation)")
    return {split: w.written for split, w in writers.items() if w.written}


def total_tokens(shards: list[TokenShard]) -> int:
    return sum(s.num_tokens for s in shards)
