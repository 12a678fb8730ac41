"""Tokenizer behaviour on a tiny vocabulary, checked against HF `tokenizers` built from the same file."""

from __future__ import annotations

import copy
import json
import time
import unicodedata
from pathlib import Path
from typing import Any

import pytest
import tokenizers

from qwen2.tokenizer import Tokenizer
from qwen2.tokenizer.engine import LONG_SPACE_RUN, TiktokenEngine, _has_long_space_run, merges_match_ranks
from qwen2.tokenizer.vocab import parse_tokenizer_json, token_to_bytes
from tokenizer_tiny import tiny_tokenizer_json

TEXTS = [
    "hello world",
    " hello  world\n\nthe thing",
    "I'll say it's HE'LL we'RE",
    "12345 and 3.14159",
    "tabs\tand\r\nCRLF\n\n\n  trailing   ",
    "    indented code:\n        return x\n",
    "你好, 世界! 你你",
    "emoji 🙂🦜 and ZWJ 👩‍👩‍👧",
    "accents: café naïve e\u0301 A\u030a",
    "",
    " ",
    "\n",
    "!!!???...---",
]
SPECIAL_TEXTS = [
    "say <|im_end|> now",
    "<|im_start|>user\nhi<|im_end|>\n",
    "a<|endoftext|>b<|endoftext|><|endoftext|>",
    "partial <|im_end| and <|im_start",
]


def test_encode_matches_reference_with_special_parsing(tiny: Tokenizer, tiny_reference: Any) -> None:
    for text in TEXTS + SPECIAL_TEXTS + ["x <tool_call> y"]:
        assert tiny.encode(text, allow_special=True) == tiny_reference.encode(text).ids, text


def test_encode_matches_reference_without_special_parsing(tiny: Tokenizer, tiny_json: dict[str, Any]) -> None:
    reference = tokenizers.Tokenizer.from_str(json.dumps(tiny_json))
    reference.encode_special_tokens = True  # HF's split_special_tokens=True
    for text in TEXTS + SPECIAL_TEXTS:
        assert tiny.encode(text) == reference.encode(text).ids, text


def test_non_special_added_tokens_are_plain_text_unless_allowed(tiny: Tokenizer, tiny_json: dict[str, Any]) -> None:
    # Deliberate deviation: HF still matches the non-special <tool_call> with split_special_tokens=True;
    # we never turn user text into an added-token id.
    tool_call = tiny.token_to_id("<tool_call>")
    assert tool_call not in tiny.encode("x <tool_call> y")
    assert tool_call in tiny.encode("x <tool_call> y", allow_special=True)


def test_decode_round_trip_and_nfc(tiny: Tokenizer) -> None:
    for text in TEXTS:
        assert tiny.decode(tiny.encode(text)) == unicodedata.normalize("NFC", text)
    assert tiny.encode("e\u0301") == tiny.encode("é")


def test_added_token_is_matched_before_normalisation(tiny: Tokenizer, tiny_reference: Any) -> None:
    # '>' + U+0338 composes to '≯' under NFC; HF splits added tokens off the raw text first, so the
    # token survives and the combining mark is normalised on its own.
    text = "<|im_end|>\u0338x"
    assert tiny.encode(text, allow_special=True) == tiny_reference.encode(text).ids
    assert tiny.encode(text, allow_special=True)[0] == tiny.token_to_id("<|im_end|>")


def test_lone_surrogates_become_replacement_characters(tiny: Tokenizer) -> None:
    assert tiny.encode("a\ud800b") == tiny.encode("a\ufffdb")
    assert tiny.encode("\ud83d\ude42") == tiny.encode("🙂")  # a surrogate pair is its character


def test_decode_validates_ids(tiny: Tokenizer) -> None:
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tiny.decode([tiny.vocab_size])
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tiny.decode([5, -1])
    with pytest.raises(ValueError, match="integers"):
        tiny.decode([1.5])  # type: ignore[list-item]
    assert tiny.decode([]) == ""


def test_decode_replaces_invalid_utf8_and_skips_control_tokens(tiny: Tokenizer) -> None:
    cut = tiny.encode("🙂")[:2]  # first half of a 4-byte character
    assert tiny.decode(cut) == "\ufffd"
    ids = tiny.encode("<|im_start|>hi<tool_call><|im_end|>", allow_special=True)
    assert tiny.decode(ids) == "<|im_start|>hi<tool_call><|im_end|>"
    assert tiny.decode(ids, skip_special=True) == "hi<tool_call>"  # <tool_call> is not a control token


def test_vocabulary_properties(tiny: Tokenizer) -> None:
    n = 256 + 19
    assert tiny.vocab_size == n + 4
    assert (tiny.pad_token_id, tiny.eos_token_id, tiny.bos_token_id) == (n, n + 2, None)
    assert tiny.special_ids == {n, n + 1, n + 2}
    assert tiny.stop_ids == (n + 2, n)
    assert tiny.added_tokens == {"<|endoftext|>": n, "<|im_start|>": n + 1, "<|im_end|>": n + 2, "<tool_call>": n + 3}
    assert tiny.token_to_id("Ġworld") == tiny.encode(" world")[0]
    assert tiny.token_to_id("nope") is None
    assert tiny.id_to_token(tiny.encode(" world")[0]) == "Ġworld"
    assert tiny.id_to_token(n + 1) == "<|im_start|>"
    with pytest.raises(ValueError):
        tiny.id_to_token(n + 4)
    assert tiny.chat_template is None
    assert tiny.engine_name == "tiktoken"


def test_defaults_without_config(tiny_json: dict[str, Any]) -> None:
    tok = Tokenizer.from_tokenizer_json(tiny_json)
    assert tok.eos_token_id == tok.pad_token_id == tok.token_to_id("<|endoftext|>")  # Qwen2Tokenizer's defaults
    with pytest.raises(ValueError, match="eos_token"):
        Tokenizer.from_tokenizer_json(tiny_json, {"eos_token": "<|missing|>"})
    with pytest.raises(ValueError, match="tokenizer_config.json"):
        Tokenizer.from_tokenizer_json(tiny_json, ["not", "a", "dict"])  # type: ignore[arg-type]


def test_encode_rejects_non_strings(tiny: Tokenizer) -> None:
    with pytest.raises(ValueError, match="expects str"):
        tiny.encode(b"bytes")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="single str"):
        tiny.encode_batch("not a list")


def test_encode_batch_equals_encode(tiny: Tokenizer) -> None:
    texts = TEXTS * 5
    assert tiny.encode_batch(texts) == [tiny.encode(t) for t in texts]
    assert tiny.encode_batch(SPECIAL_TEXTS, allow_special=True, num_threads=1) == [
        tiny.encode(t, allow_special=True) for t in SPECIAL_TEXTS
    ]


# ----------------------------------------------------------------------------------------------------
# Engine choice


def _reordered(obj: dict[str, Any]) -> dict[str, Any]:
    """Same vocab, but the first two merges swapped: merge order no longer equals rank order."""
    changed = copy.deepcopy(obj)
    merges = changed["model"]["merges"]
    merges[0], merges[1] = merges[1], merges[0]
    return changed


def _non_canonical() -> dict[str, Any]:
    """'abc' built from (a, bc) although tiktoken, which merges 'ab' first, would build it from (ab, c)."""
    obj = tiny_tokenizer_json(words=[b"ab", b"bc"])
    vocab = obj["model"]["vocab"]
    vocab["abc"] = len(vocab)
    obj["model"]["merges"].append("a bc")
    for i, token in enumerate(obj["added_tokens"]):
        token["id"] = len(vocab) + i
    return obj


@pytest.mark.parametrize("make", [_reordered, lambda _: _non_canonical()], ids=["reordered", "non-canonical"])
def test_vocab_unsafe_for_tiktoken_uses_tokenizers_engine(tiny_json: dict[str, Any], make: Any) -> None:
    obj = make(tiny_json)
    tok = Tokenizer.from_tokenizer_json(obj)
    assert tok.engine_name == "tokenizers"
    reference = tokenizers.Tokenizer.from_str(json.dumps(obj))
    for text in TEXTS + SPECIAL_TEXTS + ["abc xabcabc bcabc"]:
        assert tok.encode(text, allow_special=True) == reference.encode(text).ids, text


def test_tiktoken_would_be_wrong_on_non_canonical_vocab() -> None:
    # Why the check exists: forced onto tiktoken, the non-canonical vocab gives different ids.
    obj = _non_canonical()
    vocab = parse_tokenizer_json(obj)
    raw = [token_to_bytes(t) for t in vocab.tokens]
    assert not merges_match_ranks(raw, vocab.merges, vocab.tokens)
    reference = tokenizers.Tokenizer.from_str(json.dumps(obj))
    assert TiktokenEngine(vocab, raw).encode("abc") != reference.encode("abc").ids


def test_long_space_run_detection() -> None:
    n = LONG_SPACE_RUN
    assert not _has_long_space_run("a " * n)
    assert not _has_long_space_run("x" * (3 * n))
    assert _has_long_space_run("x" * 12345 + " \t\n" * (2 * n // 3 + 1) + "y")
    for offset in (0, 1, n // 2, n - 1):  # any run of 2n chars is found, wherever it starts
        assert _has_long_space_run("x" * offset + "\u3000" * (2 * n) + "x")


def test_whitespace_run_beyond_tiktoken_regex_limit(tiny: Tokenizer, tiny_reference: Any) -> None:
    # tiktoken's regex engine panics near 1M whitespace characters; such text goes to tokenizers.
    text = "a" + " " * 1_100_000 + "b\n"
    start = time.thread_time()
    ids = tiny.encode(text)
    assert time.thread_time() - start < 20.0  # blow-up guard with 20x headroom, not a benchmark
    assert ids == tiny_reference.encode(text).ids


# ----------------------------------------------------------------------------------------------------
# Files


def test_save_and_from_dir_round_trip(tiny: Tokenizer, tmp_path: Path) -> None:
    tiny.save(tmp_path)
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["merges.txt", "tokenizer.json", "tokenizer_config.json", "vocab.json"]
    assert (tmp_path / "merges.txt").read_text(encoding="utf-8").startswith("#version: 0.2\nh e\n")
    config = json.loads((tmp_path / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert config["eos_token"] == "<|im_end|>" and config["added_tokens_decoder"][str(tiny.eos_token_id)]["special"]
    loaded = Tokenizer.from_dir(tmp_path)
    assert [loaded.encode(t, allow_special=True) for t in TEXTS + SPECIAL_TEXTS] == [
        tiny.encode(t, allow_special=True) for t in TEXTS + SPECIAL_TEXTS
    ]
    facts = lambda t: (t.eos_token_id, t.pad_token_id, t.special_ids)  # noqa: E731
    assert facts(loaded) == facts(tiny)

    # Without tokenizer.json: the slow-tokenizer files plus added_tokens_decoder.
    (tmp_path / "tokenizer.json").unlink()
    from_vocab_files = Tokenizer.from_dir(tmp_path)
    text = SPECIAL_TEXTS[1]
    assert from_vocab_files.encode(text, allow_special=True) == tiny.encode(text, allow_special=True)
    assert from_vocab_files.special_ids == tiny.special_ids


def test_chat_template_files_take_precedence(tiny: Tokenizer, tmp_path: Path) -> None:
    tiny.save(tmp_path)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text(encoding="utf-8"))
    config["chat_template"] = "from config"
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    assert Tokenizer.from_dir(tmp_path).chat_template == "from config"
    (tmp_path / "chat_template.json").write_text(json.dumps({"chat_template": "from json"}), encoding="utf-8")
    assert Tokenizer.from_dir(tmp_path).chat_template == "from json"
    (tmp_path / "chat_template.jinja").write_text("from jinja", encoding="utf-8")
    assert Tokenizer.from_dir(tmp_path).chat_template == "from jinja"
    saved = tmp_path / "again"
    Tokenizer.from_dir(tmp_path).save(saved)
    assert json.loads((saved / "tokenizer_config.json").read_text(encoding="utf-8"))["chat_template"] == "from jinja"


def test_from_dir_errors_name_the_file(tiny: Tokenizer, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="not a directory"):
        Tokenizer.from_dir(tmp_path / "missing")
    with pytest.raises(ValueError, match="needs tokenizer.json"):
        Tokenizer.from_dir(tmp_path)
    tiny.save(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(ValueError, match=r"tokenizer_config\.json: invalid JSON"):
        Tokenizer.from_dir(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text("[1, 2]", encoding="utf-8")
    with pytest.raises(ValueError, match=r"tokenizer_config\.json: expected a JSON object"):
        Tokenizer.from_dir(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text('{"eos_token": 5}', encoding="utf-8")
    with pytest.raises(ValueError, match="eos_token must be"):
        Tokenizer.from_dir(tmp_path)
    (tmp_path / "tokenizer_config.json").unlink()
    (tmp_path / "tokenizer.json").write_bytes(b"\xff\xfe")
    with pytest.raises(ValueError, match=r"tokenizer\.json: cannot read"):
        Tokenizer.from_dir(tmp_path)
    (tmp_path / "tokenizer.json").unlink()
    (tmp_path / "merges.txt").write_text("#version: 0.2\nh e\nbad line here\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"merges\.txt: line 3"):
        Tokenizer.from_dir(tmp_path)
    (tmp_path / "vocab.json").write_text('["a"]', encoding="utf-8")
    with pytest.raises(ValueError, match=r"vocab\.json: expected a JSON object"):
        Tokenizer.from_dir(tmp_path)
