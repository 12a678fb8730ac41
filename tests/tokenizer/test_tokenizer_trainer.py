"""BBPE training: the learned tokenizer loads here and in transformers with identical ids on unseen
multilingual text, is lossless, deterministic, and has Qwen2's layout (bytes, merges, control tokens)."""

from __future__ import annotations

import json

import pytest

from qwen2.cli import main
from qwen2.tokenizer import Tokenizer, encode_chat
from qwen2.tokenizer.trainer import CONTROL_TOKENS, TrainerConfig, train_tokenizer
from tokenizer_corpus import locale_strings, python_sources

VOCAB = 2000


@pytest.fixture(scope="module")
def corpus() -> list[str]:
    docs = python_sources(300_000)
    for lang in ("zh_CN", "ru", "ar", "fr"):
        docs += locale_strings(lang, 40_000)
    return docs


@pytest.fixture(scope="module")
def trained(corpus, tmp_path_factory):
    tokenizer = train_tokenizer(corpus, TrainerConfig(vocab_size=VOCAB, show_progress=False))
    out = tmp_path_factory.mktemp("tok")
    tokenizer.save(out)
    return tokenizer, out


def held_out() -> list[str]:
    # Different stdlib files and catalogs than the corpus (sorted selections, taken from the far end).
    texts = python_sources(3_000_000)[-3:]
    for lang in ("ja", "de", "ko"):
        texts += locale_strings(lang, 20_000)
    texts += ["naïve café — émigré, Ǆ, e\u0301, 🙂👍🏽, \t\ttabs  and   spaces\r\n\r\n",
              "<|im_end|> written by a user is text", "12345678901234567890 3.14159 0x1F"]
    return texts


def test_layout_and_sizes(trained):
    tokenizer, _ = trained
    assert tokenizer.vocab_size == VOCAB
    assert [tokenizer.token_to_id(t) for t in CONTROL_TOKENS] == [VOCAB - 3, VOCAB - 2, VOCAB - 1]
    assert tokenizer.eos_token_id == tokenizer.pad_token_id == VOCAB - 3
    assert set(tokenizer.stop_ids) == {VOCAB - 3, VOCAB - 1}
    assert [tokenizer.decode_bytes([i]) for i in range(256)] == [bytes([b]) for b in range(256)]
    # it learned real merges: common code words are single tokens
    assert len(tokenizer.encode(" return")) == 1 and len(tokenizer.encode(" self")) == 1


def test_transformers_loads_it_with_identical_ids(trained):
    transformers = pytest.importorskip("transformers")
    tokenizer, directory = trained
    reference = transformers.AutoTokenizer.from_pretrained(str(directory))
    for text in held_out():
        ids = tokenizer.encode(text, allow_special=True)  # transformers' default matches control tokens in text
        assert ids == reference.encode(text), text[:80]
        assert tokenizer.decode(ids) == reference.decode(ids)
    assert VOCAB - 1 not in tokenizer.encode("<|im_end|>")  # ours does not, unless asked
    chat = [{"role": "user", "content": "hi"}]
    assert encode_chat(tokenizer, chat, add_generation_prompt=True) == \
        reference.apply_chat_template(chat, add_generation_prompt=True, tokenize=True, return_dict=False)


def test_round_trip_and_reload(trained):
    tokenizer, directory = trained
    reloaded = Tokenizer.from_dir(directory)
    for text in held_out():
        ids = tokenizer.encode(text)
        assert reloaded.encode(text) == ids
        assert tokenizer.decode(ids) == __import__("unicodedata").normalize("NFC", text)


def test_training_is_deterministic(corpus, trained):
    again = train_tokenizer(corpus, TrainerConfig(vocab_size=VOCAB, show_progress=False))
    text = "\n".join(held_out())
    assert again.encode(text) == trained[0].encode(text)


def test_bad_configs_are_named():
    with pytest.raises(ValueError, match="vocab_size must be at least 259"):
        TrainerConfig(vocab_size=100)
    with pytest.raises(ValueError, match="control tokens must be distinct"):
        TrainerConfig(vocab_size=1000, control_tokens=("<a>", "<a>"))


def test_cli_writes_the_hf_files(tmp_path, capsys):
    (tmp_path / "docs.jsonl").write_text("\n".join(json.dumps({"text": t}) for t in python_sources(50_000)),
                                         encoding="utf-8")
    out = tmp_path / "tok"
    assert main(["tokenizer", "train", "--input", str(tmp_path / "docs.jsonl"), "--vocab-size", "600",
                 "--out", str(out), "--extra-token", "<tool_call>"]) == 0
    assert {p.name for p in out.iterdir()} == {"tokenizer.json", "vocab.json", "merges.txt", "tokenizer_config.json"}
    tokenizer = Tokenizer.from_dir(out)
    assert tokenizer.vocab_size == 600 and tokenizer.token_to_id("<tool_call>") == 599
    assert "600 tokens (596 regular + 4 control)" in capsys.readouterr().err
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\nnot json\n', encoding="utf-8")
    assert main(["tokenizer", "train", "--input", str(tmp_path / "bad.jsonl"), "--vocab-size", "600",
                 "--out", str(tmp_path / "t2")]) == 2
    assert "bad.jsonl:2: not valid JSON" in capsys.readouterr().err
