"""The data of a Qwen2 tokenizer and its Hugging Face `tokenizer.json` form.

A `Vocabulary` is what every constructor reduces to: the regular byte-level BPE tokens (ids 0..n-1),
the merges, and the added tokens (ids n..n+k-1, e.g. `<|endoftext|>`, `<|im_end|>`). This module
parses and validates a `tokenizer.json` object into one, writes one back in the official Qwen2
layout, and converts the plain lists a GGUF file carries. It imports neither tiktoken nor gguf.

Only the exact Qwen2 pipeline is accepted (NFC normaliser, the Qwen2 split regex, byte-level BPE):
anything else would be silently tokenised differently, so it is refused with a ValueError.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

# The Qwen2 pre-tokenizer regex (HF `PRETOKENIZE_REGEX`): contractions, letter runs with one optional
# leading non-letter, single digits, punctuation runs, newline runs, and whitespace not followed by text.
PRETOKENIZE_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"""
    r"""| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map used by byte-level BPE files.

    Printable Latin-1 bytes map to themselves; the 68 others (controls, space, 0x7F-0xA0, 0xAD) are
    shifted to U+0100.. in byte order, which is why a space appears as "Ġ" (U+0120) in vocab files.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    mapping = {b: chr(b) for b in printable}
    shifted = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + shifted)
            shifted += 1
    return mapping


BYTE_TO_UNICODE: dict[int, str] = _bytes_to_unicode()
_UNICODE_TO_BYTE = {ord(c): b for b, c in BYTE_TO_UNICODE.items()}
# str.translate leaves unmapped characters alone, so characters below U+0144 that are not part of the
# alphabet (e.g. a raw space) are sent to U+FFFF, which then fails the latin-1 encode like any other stray.
_TO_LATIN1 = {cp: (_UNICODE_TO_BYTE[cp] if cp in _UNICODE_TO_BYTE else 0xFFFF) for cp in range(0x144)}
_FROM_LATIN1 = {b: c for b, c in BYTE_TO_UNICODE.items()}


def token_to_bytes(token: str) -> bytes:
    """Raw bytes of a byte-level token string ("Ġhello" -> b" hello"); ValueError if not in the alphabet."""
    try:
        return token.translate(_TO_LATIN1).encode("latin-1")
    except UnicodeEncodeError:
        raise ValueError(f"token {token!r} contains characters outside the byte-level alphabet") from None


def bytes_to_token(raw: bytes) -> str:
    """Inverse of `token_to_bytes`."""
    return raw.decode("latin-1").translate(_FROM_LATIN1)


@dataclass(frozen=True)
class AddedToken:
    """A token matched as a whole string before BPE (control tokens and e.g. `<tool_call>`).

    `special` is HF's flag: True for control tokens (dropped by `decode(skip_special=True)`), False for
    user-defined ones such as Qwen2.5's `<tool_call>`.
    """

    id: int
    content: str
    special: bool


@dataclass(frozen=True)
class Vocabulary:
    """Validated tokenizer data. Regular ids are 0..len(tokens)-1; added ids follow densely."""

    tokens: list[str]  # byte-level strings, index = id
    merges: list[tuple[str, str]]  # in priority order
    added: list[AddedToken]  # sorted by id


# ---------------------------------------------------------------------------------------------------
# tokenizer.json -> Vocabulary


def _fail(field: str, problem: str) -> ValueError:
    return ValueError(f"tokenizer.json: {field}: {problem}")


def _check_pipeline(obj: dict[str, Any]) -> None:
    """Refuse anything but the Qwen2 normaliser / pre-tokenizer / decoder, which this package implements."""
    normalizer = obj.get("normalizer")
    if not (isinstance(normalizer, dict) and normalizer.get("type") == "NFC"):
        # Notably transformers' GGUF converter drops the NFC normaliser; such a file would encode
        # decomposed accents differently from the reference tokenizer.
        raise _fail("normalizer", f"expected {{'type': 'NFC'}} (the Qwen2 normaliser), got {normalizer!r}")
    pre = obj.get("pre_tokenizer")
    steps = pre.get("pretokenizers") if isinstance(pre, dict) and pre.get("type") == "Sequence" else None
    if not (isinstance(steps, list) and len(steps) == 2 and all(isinstance(s, dict) for s in steps)):
        raise _fail("pre_tokenizer", f"expected Sequence[Split, ByteLevel], got {pre!r}"[:300])
    split, byte_level = steps
    pattern = split.get("pattern")
    if not (
        split.get("type") == "Split"
        and isinstance(pattern, dict)
        and pattern.get("Regex") == PRETOKENIZE_REGEX
        and split.get("behavior") == "Isolated"
        and not split.get("invert", False)
    ):
        raise _fail("pre_tokenizer.pretokenizers[0]", f"expected the Qwen2 Split regex (Isolated), got {split!r}"[:300])
    if not (
        byte_level.get("type") == "ByteLevel"
        and not byte_level.get("add_prefix_space", False)
        and not byte_level.get("use_regex", True)
    ):
        expected = "ByteLevel(add_prefix_space=False, use_regex=False)"
        raise _fail("pre_tokenizer.pretokenizers[1]", f"expected {expected}, got {byte_level!r}")
    decoder = obj.get("decoder")
    if decoder is not None and not (isinstance(decoder, dict) and decoder.get("type") == "ByteLevel"):
        raise _fail("decoder", f"expected ByteLevel, got {decoder!r}")
    post = obj.get("post_processor")
    if post is not None and not (isinstance(post, dict) and post.get("type") == "ByteLevel"):
        # e.g. TemplateProcessing would add BOS/EOS ids that encode() does not add.
        raise _fail("post_processor", f"expected null or ByteLevel, got {post!r}"[:300])


def _parse_model(model: Any) -> tuple[list[str], list[tuple[str, str]]]:
    if not isinstance(model, dict):
        raise _fail("model", f"expected an object, got {type(model).__name__}")
    if model.get("type", "BPE") != "BPE":
        raise _fail("model.type", f"expected 'BPE', got {model.get('type')!r}")
    for key, allowed in (
        ("dropout", (None,)),
        ("unk_token", (None,)),
        ("continuing_subword_prefix", (None, "")),
        ("end_of_word_suffix", (None, "")),
        ("byte_fallback", (None, False)),
        ("ignore_merges", (None, False)),
    ):
        if model.get(key) not in allowed:
            raise _fail(f"model.{key}", f"{model.get(key)!r} is not supported by the Qwen2 tokenizer")

    vocab = model.get("vocab")
    if not isinstance(vocab, dict) or not vocab:
        raise _fail("model.vocab", "expected a non-empty object {token: id}")
    tokens: list[str | None] = [None] * len(vocab)
    for token, idx in vocab.items():
        # bool is an int subclass; `true` as an id is a corrupt file, not id 1.
        if not isinstance(idx, int) or isinstance(idx, bool) or not 0 <= idx < len(vocab):
            raise _fail("model.vocab", f"id of {token!r} must be an integer in [0, {len(vocab)}), got {idx!r}")
        if tokens[idx] is not None:
            raise _fail("model.vocab", f"id {idx} is used by both {tokens[idx]!r} and {token!r}")
        tokens[idx] = token
    # Dense ids are now guaranteed: len(vocab) distinct ids in [0, len(vocab)).

    raw_merges = model.get("merges")
    if not isinstance(raw_merges, list):
        raise _fail("model.merges", f"expected a list, got {type(raw_merges).__name__}")
    merges: list[tuple[str, str]] = []
    for i, merge in enumerate(raw_merges):
        # Older files write "a b", newer ones ["a", "b"]; byte-level tokens never contain a space.
        pair = merge.split(" ") if isinstance(merge, str) else merge
        if not (isinstance(pair, (list, tuple)) and len(pair) == 2 and all(isinstance(p, str) for p in pair)):
            raise _fail(f"model.merges[{i}]", f"expected 'a b' or ['a', 'b'], got {merge!r}")
        left, right = pair
        if left not in vocab or right not in vocab or left + right not in vocab:
            raise _fail(f"model.merges[{i}]", f"{merge!r}: parts and result must all be in the vocab")
        merges.append((left, right))
    return tokens, merges  # type: ignore[return-value]


def _parse_added(raw: Any, first_id: int) -> list[AddedToken]:
    if raw is None:
        return []
    if not isinstance(raw, list):
        raise _fail("added_tokens", f"expected a list, got {type(raw).__name__}")
    added = []
    for i, entry in enumerate(raw):
        where = f"added_tokens[{i}]"
        if not isinstance(entry, dict):
            raise _fail(where, f"expected an object, got {entry!r}")
        idx, content = entry.get("id"), entry.get("content")
        if not isinstance(idx, int) or isinstance(idx, bool):
            raise _fail(where, f"id must be an integer, got {idx!r}")
        if not isinstance(content, str) or not content:
            raise _fail(where, f"content must be a non-empty string, got {content!r}")
        for flag in ("lstrip", "rstrip", "single_word", "normalized"):
            # Qwen2 sets all four to false; the other behaviours are not implemented, so refuse them.
            if entry.get(flag, False):
                raise _fail(where, f"{flag}=true is not supported (token {content!r})")
        added.append(AddedToken(id=idx, content=content, special=bool(entry.get("special", False))))
    added.sort(key=lambda t: t.id)
    expected = list(range(first_id, first_id + len(added)))
    if [t.id for t in added] != expected:
        raise _fail("added_tokens", f"ids must continue the vocab densely from {first_id}, got {[t.id for t in added]}")
    if len({t.content for t in added}) != len(added):
        raise _fail("added_tokens", "duplicate content")
    return added


def parse_tokenizer_json(obj: Any) -> Vocabulary:
    """Validate a `tokenizer.json` object (already JSON-decoded) and extract its Vocabulary.

    Raises ValueError naming the offending field for anything that is not a Qwen2 byte-level BPE file.
    """
    if not isinstance(obj, dict):
        raise ValueError(f"tokenizer.json: expected a JSON object, got {type(obj).__name__}")
    _check_pipeline(obj)
    tokens, merges = _parse_model(obj.get("model"))
    for token in tokens:
        token_to_bytes(token)  # raises for a token outside the byte-level alphabet
    added = _parse_added(obj.get("added_tokens"), first_id=len(tokens))
    regular = set(tokens)
    clash = [t.content for t in added if t.content in regular]
    if clash:
        raise _fail("added_tokens", f"{clash[:3]} also appear in model.vocab")
    return Vocabulary(tokens=tokens, merges=merges, added=added)


# ---------------------------------------------------------------------------------------------------
# Vocabulary -> tokenizer.json


def _added_token_entry(token: AddedToken) -> dict[str, Any]:
    return {
        "id": token.id,
        "content": token.content,
        "single_word": False,
        "lstrip": False,
        "rstrip": False,
        "normalized": False,
        "special": token.special,
    }


def build_tokenizer_json(vocab: Vocabulary) -> dict[str, Any]:
    """The `tokenizer.json` object in the layout of the official Qwen2 files (HF `Qwen2Converter`)."""
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False}
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [_added_token_entry(t) for t in vocab.added],
        "normalizer": {"type": "NFC"},
        "pre_tokenizer": {
            "type": "Sequence",
            "pretokenizers": [
                {"type": "Split", "pattern": {"Regex": PRETOKENIZE_REGEX}, "behavior": "Isolated", "invert": False},
                dict(byte_level),
            ],
        },
        "post_processor": dict(byte_level),
        "decoder": dict(byte_level),
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": None,
            "continuing_subword_prefix": "",
            "end_of_word_suffix": "",
            "fuse_unk": False,
            "byte_fallback": False,
            "ignore_merges": False,
            "vocab": {token: i for i, token in enumerate(vocab.tokens)},
            "merges": [f"{a} {b}" for a, b in vocab.merges],
        },
    }


def build_tokenizer_config(
    added: list[AddedToken],
    *,
    bos_token: str | None,
    eos_token: str | None,
    pad_token: str | None,
    chat_template: str | None,
) -> dict[str, Any]:
    """A `tokenizer_config.json` object in the Qwen2 layout (transformers reads it next to tokenizer.json)."""
    named = {bos_token, eos_token, pad_token}
    config: dict[str, Any] = {
        "add_bos_token": False,
        "add_prefix_space": False,
        "added_tokens_decoder": {
            str(t.id): {k: v for k, v in _added_token_entry(t).items() if k != "id"} for t in added
        },
        "additional_special_tokens": [t.content for t in added if t.special and t.content not in named],
        "bos_token": bos_token,
        "clean_up_tokenization_spaces": False,
        "eos_token": eos_token,
        "errors": "replace",
        "pad_token": pad_token,
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
    }
    if chat_template is not None:
        config["chat_template"] = chat_template
    return config


# ---------------------------------------------------------------------------------------------------
# GGUF lists -> tokenizer.json

# GGUF `tokenizer.ggml.token_type` values (llama.cpp `llama_token_type`).
_GGUF_NORMAL, _GGUF_UNKNOWN, _GGUF_CONTROL, _GGUF_USER_DEFINED, _GGUF_UNUSED, _GGUF_BYTE = 1, 2, 3, 4, 5, 6


def tokenizer_json_from_gguf(
    tokens: list[str],
    token_types: list[int],
    merges: list[str],
    *,
    bos_id: int | None,
    eos_id: int | None,
    pad_id: int | None,
    chat_template: str | None,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Rebuild (tokenizer.json, tokenizer_config.json) objects from a GGUF file's tokenizer metadata.

    `tokens`, `token_types`, `merges` are `tokenizer.ggml.{tokens,token_type,merges}`. Normal tokens
    become the BPE vocab, control (3) and user-defined (4) tokens become added tokens (special only for
    control), and unused rows (5, the `[PAD151665]` padding of the embedding matrix) are dropped: they
    must all come after the real tokens. The NFC normaliser is restored, which transformers' own GGUF
    loader omits. Raises ValueError on inconsistent input.
    """
    if not (isinstance(tokens, list) and isinstance(token_types, list) and isinstance(merges, list)):
        raise ValueError("GGUF tokenizer: tokens, token_types and merges must be lists")
    if len(tokens) != len(token_types):
        raise ValueError(f"GGUF tokenizer: {len(tokens)} tokens but {len(token_types)} token types")
    vocab: list[str] = []
    added: list[AddedToken] = []
    kept = 0
    for i, (token, kind) in enumerate(zip(tokens, token_types)):
        if not isinstance(token, str) or not isinstance(kind, int):
            raise ValueError(f"GGUF tokenizer: entry {i} must be (str, int), got ({token!r}, {kind!r})")
        if kind == _GGUF_UNUSED:
            continue
        if kept != i:
            raise ValueError(f"GGUF tokenizer: token {i} ({token!r}) follows an unused (type 5) row")
        kept += 1
        if kind in (_GGUF_NORMAL, _GGUF_BYTE):
            if added:
                raise ValueError(f"GGUF tokenizer: regular token {i} ({token!r}) after added tokens")
            vocab.append(token)
        elif kind in (_GGUF_CONTROL, _GGUF_USER_DEFINED):
            added.append(AddedToken(id=i, content=token, special=kind == _GGUF_CONTROL))
        else:
            raise ValueError(f"GGUF tokenizer: token {i} ({token!r}) has unsupported type {kind}")
    for i, merge in enumerate(merges):
        if not isinstance(merge, str) or merge.count(" ") != 1:
            raise ValueError(f"GGUF tokenizer: merge {i} must be 'a b', got {merge!r}")
    if chat_template is not None and not isinstance(chat_template, str):
        raise ValueError(f"GGUF tokenizer: chat_template must be a string, got {type(chat_template).__name__}")

    def content(name: str, idx: int | None) -> str | None:
        if idx is None:
            return None
        if not isinstance(idx, int) or not 0 <= idx < kept:
            raise ValueError(f"GGUF tokenizer: {name} {idx!r} is not a token id below {kept}")
        return added[idx - len(vocab)].content if idx >= len(vocab) else vocab[idx]

    model = Vocabulary(tokens=vocab, merges=[tuple(m.split(" ")) for m in merges], added=added)  # type: ignore[misc]
    config = build_tokenizer_config(
        added,
        bos_token=content("bos_id", bos_id),
        eos_token=content("eos_id", eos_id),
        pad_token=content("pad_id", pad_id),
        chat_template=chat_template,
    )
    return build_tokenizer_json(model), config
