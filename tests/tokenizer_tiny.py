"""A tiny hand-made Qwen2-style vocabulary for fast tests: 256 byte tokens, a few merges derived the
way tiktoken ranks map to HF merges (so the tiktoken engine is chosen), and four added tokens."""

from __future__ import annotations

from typing import Any

from qwen2.tokenizer.vocab import BYTE_TO_UNICODE, PRETOKENIZE_REGEX

TINY_WORDS = [b"he", b"ll", b"llo", b"hello", b" w", b"or", b"ld", b" wor", b" world", b"  ", b"    ",
              b"\n\n", b"in", b"ing", b" t", b" th", b" the", b"\xe4\xbd", b"\xe4\xbd\xa0"]
TINY_ADDED = [("<|endoftext|>", True), ("<|im_start|>", True), ("<|im_end|>", True), ("<tool_call>", False)]


def _token(raw: bytes) -> str:
    return "".join(BYTE_TO_UNICODE[b] for b in raw)


def _derive_merge(word: bytes, ranks: dict[bytes, int]) -> tuple[bytes, bytes]:
    """Split of `word` by BPE with the ranks known so far (how tiktoken ranks map to HF merges)."""
    parts = [word[i : i + 1] for i in range(len(word))]
    while len(parts) > 2:
        pairs = [(ranks.get(parts[i] + parts[i + 1]), i) for i in range(len(parts) - 1)]
        rank, i = min((p for p in pairs if p[0] is not None), default=(None, -1))
        assert rank is not None, f"{word!r} cannot be built from earlier tokens"
        parts[i : i + 2] = [parts[i] + parts[i + 1]]
    return parts[0], parts[1]


def tiny_tokenizer_json(words: list[bytes] = TINY_WORDS, added: list[tuple[str, bool]] = TINY_ADDED) -> dict[str, Any]:
    ranks = {bytes([b]): b for b in range(256)}
    merges = []
    for word in words:
        a, b = _derive_merge(word, ranks)
        merges.append(f"{_token(a)} {_token(b)}")
        ranks[word] = len(ranks)
    vocab = {_token(raw): i for raw, i in ranks.items()}
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False}
    return {
        "version": "1.0",
        "added_tokens": [
            {"id": len(vocab) + i, "content": c, "special": s, "lstrip": False, "rstrip": False,
             "normalized": False, "single_word": False}
            for i, (c, s) in enumerate(added)
        ],
        "normalizer": {"type": "NFC"},
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": PRETOKENIZE_REGEX}, "behavior": "Isolated", "invert": False},
            byte_level]},
        "post_processor": byte_level,
        "decoder": byte_level,
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": "",
                  "end_of_word_suffix": "", "fuse_unk": False, "byte_fallback": False, "vocab": vocab,
                  "merges": merges},
    }
