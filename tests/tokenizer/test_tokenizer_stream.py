"""StreamDecoder: only complete UTF-8 text comes out, and the pieces add up to decode()."""

from __future__ import annotations

import pytest

from qwen2.tokenizer import StreamDecoder, Tokenizer


def _stream(tok: Tokenizer, ids: list[int], **kwargs: bool) -> list[str]:
    decoder = StreamDecoder(tok, **kwargs)
    return [decoder.push(i) for i in ids] + [decoder.flush()]


def test_multibyte_characters_are_held_until_complete(tiny: Tokenizer) -> None:
    ids = tiny.encode("好🙂")  # 3 + 4 single-byte tokens in the tiny vocab
    assert len(ids) == 7
    assert _stream(tiny, ids) == ["", "", "好", "", "", "", "🙂", ""]


def test_pieces_concatenate_to_decode(tiny: Tokenizer) -> None:
    text = "hello 你好 world 🙂🦜 <|im_end|> end"
    ids = tiny.encode(text, allow_special=True)
    pieces = _stream(tiny, ids)
    assert "".join(pieces) == tiny.decode(ids) == text
    assert all("\ufffd" not in p for p in pieces)
    skipped = _stream(tiny, ids, skip_special=True)
    assert "".join(skipped) == tiny.decode(ids, skip_special=True)


def test_invalid_and_unfinished_bytes_become_replacement_characters(tiny: Tokenizer) -> None:
    ids = tiny.encode("🙂")
    broken = ids[:2] + tiny.encode("x") + ids[:3]  # a cut emoji, then text, then an unfinished one
    pieces = _stream(tiny, broken)
    assert "".join(pieces) == tiny.decode(broken) == "\ufffdx\ufffd"
    assert pieces[-1] == "\ufffd"  # the unfinished tail is only given up by flush()


def test_flush_resets(tiny: Tokenizer) -> None:
    decoder = StreamDecoder(tiny)
    decoder.push(tiny.encode("🙂")[0])
    assert decoder.flush() == "\ufffd"
    assert decoder.push(tiny.encode("a")[0]) == "a"


def test_unknown_id_is_an_error(tiny: Tokenizer) -> None:
    with pytest.raises(ValueError, match="outside the vocabulary"):
        StreamDecoder(tiny).push(tiny.vocab_size)


@pytest.mark.real
def test_real_vocab_split_characters(qwen: Tokenizer) -> None:
    text = "罕见字𠀀𪚥 and emoji 🦩🪼🫨 in 中文 ok"
    ids = qwen.encode(text)
    split = [i for i in ids if "\ufffd" in qwen.decode([i])]
    assert split, "expected some characters to span several tokens"
    pieces = _stream(qwen, ids)
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)
