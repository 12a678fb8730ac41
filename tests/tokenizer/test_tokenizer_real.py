"""Exact-id parity with transformers' Qwen2 tokenizer on the real Qwen2.5 vocabulary (demo GGUF)."""

from __future__ import annotations

import json
import random
import time
import unicodedata
from pathlib import Path
from typing import Any

import pytest

from qwen2.tokenizer import Tokenizer
from tokenizer_corpus import locale_strings, python_sources

pytestmark = pytest.mark.real

LANGUAGES = ["zh_CN", "ja", "ko", "ar", "ru", "th", "hi", "de", "vi", "he", "el", "uk"]

SYNTHETIC = [
    "Hello world",
    "emoji: 🙂🦜🇯🇵 👩‍👩‍👧‍👦 🏳️‍🌈 ❤️‍🔥 ✊🏿 and skin tones 👍🏻👍🏼👍🏽👍🏾👍🏿",
    "whitespace:" + " " * 100 + "\n" * 30 + "\t" * 20 + " \n \n\t\r\n\r\n" * 20 + "   x   ",
    "\u00a0\u2003\u3000nbsp and ideographic spaces\u3000\u3000",
    "digits: " + "".join(str(i) for i in range(300)) + " ١٢٣ ४५६ ๑๒๓ ⅣⅫ ½",
    "contractions: I'm you're he's we've they'll I'd DON'T It'S",
    "decomposed: " + unicodedata.normalize("NFD", "café naïve Ångström Việt Nam 한국어 がぎぐ"),
    "compat chars (NFC keeps them): ﬁ ① ｶﾀｶﾅ Ｆｕｌｌ",
    "zero width: a\u200bb\u200cc\u200dd\ufeffe",
    "mixed: def f(x):\n\treturn x**2  # 平方\n",
    "combining marks Python's NFC reorders but HF's does not: \u07f3\u07fd x\u0301\u1ac0",
    "control bytes: \x00\x01\x1f\x7f end",
    "long word: " + "supercalifragilistic" * 50,
]

SPECIAL = [
    'print("<|endoftext|>")',
    "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n",
    "<|fim_prefix|>def f():<|fim_suffix|>\n<|fim_middle|>",
    "a<|vision_start|><|image_pad|><|image_pad|><|vision_end|>b",
    "<|im_end|>\u0338 and <|im_end|",
]


@pytest.fixture(scope="module")
def corpus() -> list[str]:
    docs = python_sources(400_000)
    for lang in LANGUAGES:
        docs += locale_strings(lang, 40_000)
    return docs + SYNTHETIC


def test_known_vectors(qwen: Tokenizer) -> None:
    assert qwen.encode("Hello world") == [9707, 1879]
    assert qwen.encode(" Hello world") == [21927, 1879]
    assert qwen.encode('print("<|endoftext|>")') == [1350, 9639, 91, 8691, 723, 427, 91, 82598]
    assert qwen.encode('print("<|endoftext|>")', allow_special=True) == [1350, 445, 151643, 899]


def test_vocabulary_facts(qwen: Tokenizer) -> None:
    assert qwen.engine_name == "tiktoken"  # Qwen's merges are tiktoken-derived
    assert qwen.vocab_size == 151_665
    assert (qwen.eos_token_id, qwen.pad_token_id, qwen.bos_token_id) == (151645, 151643, 151643)
    assert qwen.stop_ids == (151645, 151643)
    assert len(qwen.special_ids) == 20 and 151657 not in qwen.special_ids  # <tool_call> is not a control token
    assert qwen.token_to_id("<|file_sep|>") == 151664
    assert qwen.chat_template is not None and "<tool_call>" in qwen.chat_template


def test_corpus_ids_equal_reference(qwen: Tokenizer, reference: Any, corpus: list[str]) -> None:
    ours = qwen.encode_batch(corpus, allow_special=True)
    theirs = reference(corpus, add_special_tokens=False)["input_ids"]
    for text, a, b in zip(corpus, ours, theirs):
        assert a == b, text[:200]
    assert sum(map(len, corpus)) > 800_000


def test_added_token_strings_in_both_modes(qwen: Tokenizer, reference: Any, reference_split: Any) -> None:
    for text in SPECIAL:
        assert qwen.encode(text, allow_special=True) == reference.encode(text, add_special_tokens=False), text
        assert qwen.encode(text) == reference_split.encode(text, add_special_tokens=False), text
        assert not set(qwen.encode(text)) & set(qwen.added_tokens.values())


def test_tool_call_strings_deviate_from_split_special_tokens(qwen: Tokenizer, reference_split: Any) -> None:
    # HF's split_special_tokens=True still matches the non-special <tool_call>; we keep it plain text.
    text = "<tool_call>\n{}\n</tool_call>"
    assert 151657 in reference_split.encode(text, add_special_tokens=False)
    assert 151657 not in qwen.encode(text) and qwen.decode(qwen.encode(text)) == text


def test_codepoint_sweep(qwen: Tokenizer, reference: Any) -> None:
    """Every assigned code point in letter/digit/space/punctuation contexts: the regex classes
    (\\p{L}, \\p{N}, \\s) of tiktoken's regex engine and HF's must agree."""
    chars = [chr(c) for c in range(0x110000) if unicodedata.category(chr(c)) not in ("Cn", "Co", "Cs")]
    texts = ["".join(f"a{c} {c}1{c}!{c}\n" for c in chars[i : i + 2000]) for i in range(0, len(chars), 2000)]
    ours = qwen.encode_batch(texts)
    theirs = reference(texts, add_special_tokens=False)["input_ids"]
    assert ours == theirs


def test_decode_equals_reference(qwen: Tokenizer, reference: Any) -> None:
    rng = random.Random(0)
    for _ in range(200):
        ids = [rng.randrange(qwen.vocab_size) for _ in range(rng.randrange(1, 30))]
        assert qwen.decode(ids) == reference.decode(ids), ids
        assert qwen.decode(ids, skip_special=True) == reference.decode(ids, skip_special_tokens=True), ids


def test_decode_inverts_encode_up_to_nfc(qwen: Tokenizer, reference: Any, corpus: list[str]) -> None:
    nfc = reference.backend_tokenizer.normalizer  # HF's NFC is the reference normalisation
    for text in corpus:
        assert qwen.decode(qwen.encode(text)) == nfc.normalize_str(text), text[:200]


@pytest.mark.parametrize("unit", ["a", " ", "\n", "!", "中", "1", " \t", "\u3000", "ab ", "é"])
def test_pathological_inputs_are_fast(qwen: Tokenizer, unit: str) -> None:
    text = unit * (1_000_000 // len(unit.encode("utf-8")))
    # Not a speed benchmark: a guard against super-linear blow-ups (a quadratic BPE on 1 MB of one
    # character runs for minutes; linear work takes under a second). CPU time of this thread, so
    # other processes on the 2 cores do not count; the bound is 20x the observed cost.
    start = time.thread_time()
    ids = qwen.encode(text)
    assert time.thread_time() - start < 20.0, unit
    assert qwen.decode(ids) == text


def test_save_loads_in_transformers_with_identical_ids(qwen: Tokenizer, tmp_path: Path, corpus: list[str]) -> None:
    from transformers import AutoTokenizer

    qwen.save(tmp_path)
    hf = AutoTokenizer.from_pretrained(str(tmp_path))
    sample = corpus[::7] + SPECIAL + ["<tool_call>"]
    assert hf(sample, add_special_tokens=True)["input_ids"] == qwen.encode_batch(sample, allow_special=True)
    assert (hf.eos_token_id, hf.pad_token_id) == (qwen.eos_token_id, qwen.pad_token_id)
    assert hf.chat_template == qwen.chat_template
    reloaded = Tokenizer.from_dir(tmp_path)
    assert reloaded.encode_batch(sample) == qwen.encode_batch(sample)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert config["tokenizer_class"] == "Qwen2Tokenizer" and len(config["added_tokens_decoder"]) == 22
