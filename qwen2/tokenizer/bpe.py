"""Qwen2's byte-level BPE tokenizer: text <-> token ids, exactly as the official HF fast tokenizer.

Pipeline (HF `Qwen2Converter`): split off added tokens (only if allowed) -> NFC -> Qwen2 split regex
-> GPT-2 byte-to-unicode -> BPE. No BOS/EOS is ever added. The BPE itself runs in tiktoken or in
the `tokenizers` library, whichever `engine.build_engine` proves exact for the vocabulary.

Contracts worth knowing:
* `encode(text)` treats added-token strings such as "<|im_end|>" in `text` as plain text (HF with
  `split_special_tokens=True`, except that HF still matches the non-special `<tool_call>` tokens
  there; we never do, so user text can never produce an added-token id). `allow_special=True` matches
  HF's default behaviour.
* Lone surrogates (which HF refuses with a TypeError) are replaced by U+FFFD, as tiktoken does.
* `decode` joins token bytes and decodes UTF-8 with errors="replace"; ids outside the vocabulary are
  a ValueError (HF silently drops them).
"""

from __future__ import annotations

import hashlib
import json
import re
import unicodedata
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from tokenizers import normalizers

from qwen2.atomic import atomic_write_text
from qwen2.tokenizer.engine import Engine, build_engine
from qwen2.tokenizer.vocab import (
    AddedToken,
    Vocabulary,
    build_tokenizer_config,
    build_tokenizer_json,
    parse_tokenizer_json,
    token_to_bytes,
)

# HF's NFC (Rust unicode-normalization tables, older than Python's `unicodedata`) is used for text
# that is not already NFC: 98 combining marks added in Unicode 11+ (e.g. U+07FD, U+1AC0) are ordered
# differently by the two, and the reference ids are HF's. Text that Python deems NFC is left alone by
# both (properties of assigned characters never change), so the fast path below stays exact.
_HF_NFC = normalizers.NFC()


def _normalize(text: str) -> str:
    if text.isascii() or unicodedata.is_normalized("NFC", text):
        return text
    return _HF_NFC.normalize_str(text)


def _replace_surrogates(text: str) -> str:
    """Lone surrogates -> U+FFFD; a surrogate pair becomes its character (tiktoken's rule)."""
    if text.isascii():
        return text
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")


def _token_name(value: Any, field: str) -> str | None:
    """A special-token entry of tokenizer_config.json: null, "<|x|>" or {"content": "<|x|>", ...}."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    raise ValueError(f"tokenizer_config.json: {field} must be null, a string or {{'content': str}}, got {value!r}")


def _chat_template_of(config: dict[str, Any]) -> str | None:
    template = config.get("chat_template")
    if template is None or isinstance(template, str):
        return template
    if isinstance(template, list):
        # Named templates ([{"name": ..., "template": ...}]); the "default" one is what HF applies.
        for entry in template:
            if isinstance(entry, dict) and entry.get("name") == "default" and isinstance(entry.get("template"), str):
                return entry["template"]
        return None
    raise ValueError(f"tokenizer_config.json: chat_template must be a string or a list, got {type(template).__name__}")


class Tokenizer:
    """Qwen2 tokenizer. Build with `from_tokenizer_json`, `from_dir` or (for GGUF) via
    `tokenizer_json_from_gguf` + `from_tokenizer_json`. Immutable and thread-safe after construction."""

    def __init__(self, vocab: Vocabulary, config: dict[str, Any]) -> None:
        """Use the classmethod constructors; `vocab` must come from `parse_tokenizer_json`."""
        self._vocab = vocab
        self._config = dict(config)
        regular_bytes = [token_to_bytes(t) for t in vocab.tokens]
        self._engine: Engine = build_engine(vocab, regular_bytes)

        self._added_by_content = {t.content: t for t in vocab.added}
        # Longest first, so that of two added tokens where one is a prefix of the other, the longer wins
        # (HF matches leftmost-longest).
        alternatives = sorted(self._added_by_content, key=len, reverse=True)
        self._added_pattern = re.compile("|".join(map(re.escape, alternatives))) if alternatives else None

        self._id_to_bytes = regular_bytes + [t.content.encode("utf-8") for t in vocab.added]
        self._token_ids = {t: i for i, t in enumerate(vocab.tokens)}
        self._token_ids.update({t.content: t.id for t in vocab.added})
        self._special_ids = frozenset(t.id for t in vocab.added if t.special)

        self._eos_id = self._resolve(config, "eos_token", default="<|endoftext|>")
        self._pad_id = self._resolve(config, "pad_token", default="<|endoftext|>")
        self._bos_id = self._resolve(config, "bos_token", default=None)
        self._chat_template = _chat_template_of(self._config)

    def _resolve(self, config: dict[str, Any], field: str, *, default: str | None) -> int | None:
        name = _token_name(config[field], field) if field in config else default
        if name is None:
            return None
        if name not in self._token_ids:
            if field not in config:
                return None  # the Qwen2 default is simply absent from this (test) vocabulary
            raise ValueError(f"tokenizer_config.json: {field} {name!r} is not in the vocabulary")
        return self._token_ids[name]

    # ------------------------------------------------------------------------------------------------
    # Constructors

    @classmethod
    def from_tokenizer_json(cls, obj: dict[str, Any], tokenizer_config: dict[str, Any] | None = None) -> Tokenizer:
        """The core constructor: a decoded `tokenizer.json` object plus optional `tokenizer_config.json`.

        Raises ValueError naming the field if either is not a valid Qwen2 tokenizer description.
        """
        if tokenizer_config is None:
            tokenizer_config = {}
        if not isinstance(tokenizer_config, dict):
            raise ValueError(f"tokenizer_config.json: expected a JSON object, got {type(tokenizer_config).__name__}")
        return cls(parse_tokenizer_json(obj), tokenizer_config)

    @classmethod
    def from_dir(cls, path: str | Path) -> Tokenizer:
        """Load a HF tokenizer directory: `tokenizer.json`, or `vocab.json` + `merges.txt`, plus optional
        `tokenizer_config.json` and `chat_template.jinja` / `chat_template.json` (which win over the
        config's template, as in transformers). ValueError names the missing or malformed file."""
        directory = Path(path)
        if not directory.is_dir():
            raise ValueError(f"{directory}: not a directory")
        config_path = directory / "tokenizer_config.json"
        config = _read_json(config_path) if config_path.exists() else {}
        if not isinstance(config, dict):
            raise ValueError(f"{directory / 'tokenizer_config.json'}: expected a JSON object")
        config = dict(config)
        if (directory / "chat_template.jinja").exists():
            config["chat_template"] = _read_text(directory / "chat_template.jinja")
        elif (directory / "chat_template.json").exists():
            template = _read_json(directory / "chat_template.json")
            if not (isinstance(template, dict) and isinstance(template.get("chat_template"), str)):
                raise ValueError(f"{directory / 'chat_template.json'}: expected {{'chat_template': str}}")
            config["chat_template"] = template["chat_template"]

        if (directory / "tokenizer.json").exists():
            obj = _read_json(directory / "tokenizer.json")
        elif (directory / "vocab.json").exists() and (directory / "merges.txt").exists():
            obj = _tokenizer_json_from_vocab_files(directory, config)
        else:
            raise ValueError(f"{directory}: needs tokenizer.json, or vocab.json and merges.txt")
        try:
            return cls.from_tokenizer_json(obj, config)
        except ValueError as e:
            raise ValueError(f"{directory}: {e}") from None

    # ------------------------------------------------------------------------------------------------
    # Encoding and decoding

    def encode(self, text: str, *, allow_special: bool = False) -> list[int]:
        """Token ids of `text`; added-token strings are recognised only if `allow_special`."""
        if not isinstance(text, str):
            raise ValueError(f"encode() expects str, got {type(text).__name__}")
        text = _replace_surrogates(text)
        if not allow_special or self._added_pattern is None:
            return self._engine.encode(_normalize(text))
        ids: list[int] = []
        start = 0
        # HF splits on added tokens in the raw text, then normalises each remaining piece separately.
        for match in self._added_pattern.finditer(text):
            if match.start() > start:
                ids += self._engine.encode(_normalize(text[start : match.start()]))
            ids.append(self._added_by_content[match.group()].id)
            start = match.end()
        if start < len(text):
            ids += self._engine.encode(_normalize(text[start:]))
        return ids

    def encode_batch(
        self, texts: Sequence[str], *, allow_special: bool = False, num_threads: int = 8
    ) -> list[list[int]]:
        """`encode` on each text, in parallel threads (the BPE engines release the GIL)."""
        if isinstance(texts, str):
            raise ValueError("encode_batch() expects a sequence of str, got a single str")
        if num_threads <= 1 or len(texts) <= 1:
            return [self.encode(t, allow_special=allow_special) for t in texts]
        with ThreadPoolExecutor(max_workers=num_threads) as pool:
            return list(pool.map(lambda t: self.encode(t, allow_special=allow_special), texts))

    def decode_bytes(self, ids: Iterable[int], *, skip_special: bool = False) -> bytes:
        """The raw bytes of `ids` (may end inside a UTF-8 character). ValueError for unknown ids."""
        ids = list(ids)
        table = self._id_to_bytes
        try:
            # One C-speed range check instead of a per-id one; negative ids would silently index from the end.
            if ids and (min(ids) < 0 or max(ids) >= len(table)):
                bad = next(i for i in ids if not 0 <= i < len(table))
                raise ValueError(f"token id {bad} is outside the vocabulary [0, {len(table)})")
            if skip_special:
                special = self._special_ids
                return b"".join([table[i] for i in ids if i not in special])
            return b"".join([table[i] for i in ids])
        except TypeError:
            raise ValueError("token ids must be integers") from None

    def decode(self, ids: Iterable[int], *, skip_special: bool = False) -> str:
        """Text of `ids`; invalid UTF-8 (e.g. a cut multi-byte character) becomes U+FFFD.

        `skip_special` drops control tokens (HF `skip_special_tokens`), not `<tool_call>`.
        """
        return self.decode_bytes(ids, skip_special=skip_special).decode("utf-8", errors="replace")

    # ------------------------------------------------------------------------------------------------
    # Vocabulary facts

    @property
    def vocab_size(self) -> int:
        """Regular + added tokens (151,665 for Qwen2.5); the model's embedding may have more rows."""
        return len(self._id_to_bytes)

    @property
    def eos_token_id(self) -> int | None:
        return self._eos_id

    @property
    def pad_token_id(self) -> int | None:
        return self._pad_id

    @property
    def bos_token_id(self) -> int | None:
        """Qwen2 never prepends a BOS; this is only what the config names (often None)."""
        return self._bos_id

    @property
    def special_ids(self) -> frozenset[int]:
        """Control-token ids (added tokens with special=True; skipped by `decode(skip_special=True)`)."""
        return self._special_ids

    @property
    def added_tokens(self) -> dict[str, int]:
        """All added tokens, content -> id (control tokens plus e.g. `<tool_call>`)."""
        return {t.content: t.id for t in self._vocab.added}

    @property
    def stop_ids(self) -> tuple[int, ...]:
        """Ids that end generation: eos, plus `<|im_end|>` and `<|endoftext|>` when present (Qwen's docs
        stop on both 151645 and 151643, since base and instruct models end turns differently)."""
        stops = [self._eos_id] if self._eos_id is not None else []
        for name in ("<|im_end|>", "<|endoftext|>"):
            token = self._added_by_content.get(name)
            if token is not None and token.id not in stops:
                stops.append(token.id)
        return tuple(stops)

    @property
    def fingerprint(self) -> str:
        """sha256 of what decides the ids (regular tokens, merges, added tokens): token shards record
        it, so training refuses data tokenized with a different vocabulary."""
        if not hasattr(self, "_fingerprint"):
            canonical = json.dumps([self._vocab.tokens, self._vocab.merges,
                                    [(t.id, t.content, t.special) for t in self._vocab.added]], ensure_ascii=False)
            self._fingerprint = hashlib.sha256(canonical.encode("utf-8")).hexdigest()
        return self._fingerprint

    @property
    def chat_template(self) -> str | None:
        return self._chat_template

    @property
    def engine_name(self) -> str:
        """"tiktoken" or "tokenizers": which BPE engine `build_engine` chose."""
        return self._engine.name

    def token_to_id(self, token: str) -> int | None:
        """Id of a byte-level token string ("Ġworld") or added-token content; None if unknown."""
        return self._token_ids.get(token)

    def id_to_token(self, idx: int) -> str:
        """Byte-level string of a regular id, content of an added one; ValueError if out of range."""
        if not isinstance(idx, int) or not 0 <= idx < self.vocab_size:
            raise ValueError(f"token id {idx!r} is outside the vocabulary [0, {self.vocab_size})")
        regular = self._vocab.tokens
        return regular[idx] if idx < len(regular) else self._vocab.added[idx - len(regular)].content

    # ------------------------------------------------------------------------------------------------
    # Saving

    def tokenizer_config(self) -> dict[str, Any]:
        """tokenizer_config.json contents: the loaded config with the fields we own brought up to date."""
        config = dict(self._config)
        name = lambda idx: None if idx is None else self.id_to_token(idx)  # noqa: E731
        config.update(
            build_tokenizer_config(
                self._vocab.added,
                bos_token=name(self._bos_id),
                eos_token=name(self._eos_id),
                pad_token=name(self._pad_id),
                chat_template=self._chat_template,
            )
        )
        if self._chat_template is None:
            config.pop("chat_template", None)
        return config

    def save(self, directory: str | Path) -> None:
        """Write tokenizer.json, vocab.json, merges.txt and tokenizer_config.json into `directory`.

        `transformers.AutoTokenizer.from_pretrained(directory)` loads the result with identical ids.
        """
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        _write_json(out / "tokenizer.json", build_tokenizer_json(self._vocab))
        _write_json(out / "vocab.json", {t: i for i, t in enumerate(self._vocab.tokens)})
        lines = ["#version: 0.2", *(f"{a} {b}" for a, b in self._vocab.merges)]
        atomic_write_text(out / "merges.txt", "\n".join(lines) + "\n")
        _write_json(out / "tokenizer_config.json", self.tokenizer_config(), indent=2)


# ----------------------------------------------------------------------------------------------------
# File helpers for from_dir / save


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: cannot read: {e}") from None


def _read_json(path: Path) -> Any:
    try:
        return json.loads(_read_text(path))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: invalid JSON: {e}") from None


def _write_json(path: Path, obj: Any, indent: int | None = None) -> None:
    # ensure_ascii=False keeps the byte-level vocab readable and the files as HF writes them.
    atomic_write_text(path, json.dumps(obj, ensure_ascii=False, indent=indent) + "\n")


def _added_tokens_from_config(config: dict[str, Any], path: Path) -> list[AddedToken]:
    """`added_tokens_decoder` of tokenizer_config.json (used when there is no tokenizer.json)."""
    decoder = config.get("added_tokens_decoder", {})
    if not isinstance(decoder, dict):
        raise ValueError(f"{path}: added_tokens_decoder must be an object")
    added = []
    for key, entry in decoder.items():
        if not (key.isdigit() and isinstance(entry, dict) and isinstance(entry.get("content"), str)):
            raise ValueError(f"{path}: added_tokens_decoder[{key!r}] must map an id to {{'content': str, ...}}")
        added.append(AddedToken(id=int(key), content=entry["content"], special=bool(entry.get("special", False))))
    return sorted(added, key=lambda t: t.id)


def _tokenizer_json_from_vocab_files(directory: Path, config: dict[str, Any]) -> dict[str, Any]:
    """Assemble a tokenizer.json object from the slow-tokenizer files vocab.json + merges.txt."""
    vocab = _read_json(directory / "vocab.json")
    if not isinstance(vocab, dict):
        raise ValueError(f"{directory / 'vocab.json'}: expected a JSON object {{token: id}}")
    merges = []
    for n, line in enumerate(_read_text(directory / "merges.txt").splitlines(), start=1):
        if not line or (n == 1 and line.startswith("#version")):
            continue
        if line.count(" ") != 1:
            raise ValueError(f"{directory / 'merges.txt'}: line {n} is not 'a b': {line!r}")
        merges.append(line)
    added = _added_tokens_from_config(config, directory / "tokenizer_config.json")
    obj = build_tokenizer_json(Vocabulary(tokens=[], merges=[], added=added))
    # The files' own vocab and merges go in unchecked: parse_tokenizer_json validates them.
    obj["model"]["vocab"] = vocab
    obj["model"]["merges"] = merges
    return obj
