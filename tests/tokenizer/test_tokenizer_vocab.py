"""tokenizer.json parsing/validation, the byte-level alphabet, and the GGUF -> tokenizer.json conversion."""

from __future__ import annotations

import copy
from typing import Any, Callable

import pytest

from qwen2.tokenizer import Tokenizer, tokenizer_json_from_gguf
from qwen2.tokenizer.vocab import (
    BYTE_TO_UNICODE,
    build_tokenizer_json,
    bytes_to_token,
    parse_tokenizer_json,
    token_to_bytes,
)


def test_byte_level_alphabet() -> None:
    assert len(set(BYTE_TO_UNICODE.values())) == 256
    assert BYTE_TO_UNICODE[ord(" ")] == "Ġ" and BYTE_TO_UNICODE[ord("\n")] == "Ċ" and BYTE_TO_UNICODE[ord("A")] == "A"
    every_byte = bytes(range(256))
    assert token_to_bytes(bytes_to_token(every_byte)) == every_byte
    with pytest.raises(ValueError, match="byte-level alphabet"):
        token_to_bytes("a b")  # a raw space is not in the alphabet (it is written Ġ)
    with pytest.raises(ValueError, match="byte-level alphabet"):
        token_to_bytes("中")


def test_build_then_parse_is_identity(tiny_json: dict[str, Any]) -> None:
    vocab = parse_tokenizer_json(tiny_json)
    assert parse_tokenizer_json(build_tokenizer_json(vocab)) == vocab
    rebuilt = build_tokenizer_json(vocab)
    assert rebuilt["normalizer"] == {"type": "NFC"}
    assert rebuilt["model"]["vocab"] == tiny_json["model"]["vocab"]


def _set(path: str, value: Any) -> Callable[[dict[str, Any]], None]:
    def mutate(obj: dict[str, Any]) -> None:
        *parents, last = path.split(".")
        for key in parents:
            obj = obj[int(key)] if isinstance(obj, list) else obj[key]
        if isinstance(obj, list):
            obj[int(last)] = value
        else:
            obj[last] = value

    return mutate


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (_set("normalizer", None), "normalizer"),
        (_set("normalizer", {"type": "NFKC"}), "normalizer"),
        (_set("pre_tokenizer", {"type": "ByteLevel"}), "pre_tokenizer"),
        (_set("pre_tokenizer.pretokenizers.0.pattern", {"Regex": r"\s+"}), r"pretokenizers\[0\]"),
        (_set("pre_tokenizer.pretokenizers.1.add_prefix_space", True), r"pretokenizers\[1\]"),
        (_set("decoder", {"type": "WordPiece"}), "decoder"),
        (_set("post_processor", {"type": "TemplateProcessing"}), "post_processor"),
        (_set("model", []), "model"),
        (_set("model.type", "Unigram"), "model.type"),
        (_set("model.byte_fallback", True), "model.byte_fallback"),
        (_set("model.dropout", 0.1), "model.dropout"),
        (_set("model.vocab", []), "model.vocab"),
        (_set("model.vocab.Ā", 10_000), "model.vocab"),
        (_set("model.vocab.Ā", True), "model.vocab"),
        (_set("model.vocab.Ā", 1), "model.vocab"),
        (_set("model.merges", "h e"), "model.merges"),
        (_set("model.merges.0", "h e x"), r"model.merges\[0\]"),
        (_set("model.merges.0", ["h", "zz"]), r"model.merges\[0\]"),
        (_set("added_tokens", {}), "added_tokens"),
        (_set("added_tokens.0.id", 7), "added_tokens"),
        (_set("added_tokens.0.id", "x"), r"added_tokens\[0\]"),
        (_set("added_tokens.0.content", ""), r"added_tokens\[0\]"),
        (_set("added_tokens.0.lstrip", True), "lstrip"),
        (_set("added_tokens.0.normalized", True), "normalized"),
        (_set("added_tokens.1.content", "<|endoftext|>"), "duplicate"),
        (_set("added_tokens.0.content", "he"), "also appear"),
    ],
)
def test_invalid_tokenizer_json_names_the_field(tiny_json: dict[str, Any], mutate: Any, message: str) -> None:
    obj = copy.deepcopy(tiny_json)
    mutate(obj)
    with pytest.raises(ValueError, match=message):
        Tokenizer.from_tokenizer_json(obj)


def test_vocab_token_outside_alphabet_is_rejected(tiny_json: dict[str, Any]) -> None:
    obj = copy.deepcopy(tiny_json)
    vocab = obj["model"]["vocab"]
    vocab["has space"] = len(vocab)
    for i, token in enumerate(obj["added_tokens"]):
        token["id"] = len(vocab) + i
    with pytest.raises(ValueError, match="alphabet"):
        Tokenizer.from_tokenizer_json(obj)


def test_not_an_object() -> None:
    with pytest.raises(ValueError, match="expected a JSON object"):
        Tokenizer.from_tokenizer_json([])  # type: ignore[arg-type]


def _gguf_lists(tiny_json: dict[str, Any]) -> dict[str, Any]:
    """The tiny vocab as a GGUF stores it: regular, control/user-defined, then [PAD] rows."""
    vocab = tiny_json["model"]["vocab"]
    tokens = sorted(vocab, key=vocab.get)
    types = [1] * len(tokens)
    for added in tiny_json["added_tokens"]:
        tokens.append(added["content"])
        types.append(3 if added["special"] else 4)
    tokens += [f"[PAD{len(tokens) + i}]" for i in range(5)]
    types += [5] * 5
    return {"tokens": tokens, "token_types": types, "merges": list(tiny_json["model"]["merges"])}


def test_gguf_lists_to_tokenizer(tiny_json: dict[str, Any], tiny: Tokenizer) -> None:
    lists = _gguf_lists(tiny_json)
    n = len(tiny_json["model"]["vocab"])
    obj, config = tokenizer_json_from_gguf(**lists, bos_id=n, eos_id=n + 2, pad_id=n, chat_template="T")
    assert [t["content"] for t in obj["added_tokens"]] == ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<tool_call>"]
    assert [t["special"] for t in obj["added_tokens"]] == [True, True, True, False]
    assert obj["normalizer"] == {"type": "NFC"}  # restored; transformers' GGUF loader drops it
    named = (config["bos_token"], config["eos_token"], config["pad_token"])
    assert named == ("<|endoftext|>", "<|im_end|>", "<|endoftext|>")
    assert config["chat_template"] == "T" and config["added_tokens_decoder"][str(n + 3)]["special"] is False
    tok = Tokenizer.from_tokenizer_json(obj, config)
    assert tok.vocab_size == n + 4  # padding rows are not tokens
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (n, n + 2, n)
    text = "<|im_start|>hello world<|im_end|>"
    assert tok.encode(text, allow_special=True) == tiny.encode(text, allow_special=True)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda d: d["token_types"].pop(), "token types"),
        (lambda d: d["token_types"].__setitem__(3, 2), "unsupported type 2"),
        (lambda d: d["token_types"].__setitem__(3, 5), "follows an unused"),
        (lambda d: d["token_types"].__setitem__(-6, 1), "after added tokens"),
        (lambda d: d["merges"].__setitem__(0, "hex"), "merge 0"),
        (lambda d: d["tokens"].__setitem__(0, 5), "entry 0"),
        (lambda d: d.__setitem__("merges", "h e"), "must be lists"),
        (lambda d: d.__setitem__("eos_id", 10**6), "eos_id"),
        (lambda d: d.__setitem__("chat_template", 5), "chat_template"),
    ],
)
def test_gguf_lists_are_validated(tiny_json: dict[str, Any], change: Any, message: str) -> None:
    lists = _gguf_lists(tiny_json)
    args: dict[str, Any] = {**lists, "bos_id": None, "eos_id": 256, "pad_id": None, "chat_template": None}
    change(args)
    with pytest.raises(ValueError, match=message):
        tokenizer_json_from_gguf(**args)


def test_gguf_merges_are_checked_when_the_tokenizer_is_built(tiny_json: dict[str, Any]) -> None:
    lists = _gguf_lists(tiny_json)
    lists["merges"][0] = "h q"  # 'hq' is not a token
    obj, config = tokenizer_json_from_gguf(**lists, bos_id=None, eos_id=None, pad_id=None, chat_template=None)
    with pytest.raises(ValueError, match=r"model.merges\[0\]"):
        Tokenizer.from_tokenizer_json(obj, config)
