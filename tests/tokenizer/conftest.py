"""Fixtures: a tiny hand-made vocabulary for fast tests, and the real Qwen2.5 vocabulary from the demo
GGUF with an independent transformers reference for `@pytest.mark.real` tests."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from qwen2.tokenizer import Tokenizer, tokenizer_json_from_gguf
from tokenizer_tiny import tiny_tokenizer_json


@pytest.fixture(scope="session")
def tiny_json() -> dict[str, Any]:
    return tiny_tokenizer_json()


@pytest.fixture(scope="session")
def tiny(tiny_json: dict[str, Any]) -> Tokenizer:
    return Tokenizer.from_tokenizer_json(tiny_json, {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"})


@pytest.fixture(scope="session")
def tiny_reference(tiny_json: dict[str, Any]) -> Any:
    """HF `tokenizers` built from the very same tokenizer.json: the reference for the tiny vocab."""
    import tokenizers

    return tokenizers.Tokenizer.from_str(json.dumps(tiny_json))


# ----------------------------------------------------------------------------------------------------
# Real vocabulary (Qwen2.5) from the demo GGUF.


def _demo_gguf() -> Path | None:
    try:
        from qwen2.demo import demo_gguf_path
    except ImportError:  # qwen2.demo is written in parallel; until then the env var points at the file
        env = os.environ.get("QWEN2_DEMO_GGUF")
        return Path(env) if env else None
    return Path(demo_gguf_path())


@pytest.fixture(scope="session")
def gguf_fields() -> dict[str, Any]:
    """Tokenizer metadata of the demo GGUF as plain Python values (reading the file takes ~6 s)."""
    path = _demo_gguf()
    if path is None or not path.is_file():
        pytest.skip("demo GGUF not available (qwen2.demo or QWEN2_DEMO_GGUF)")
    from gguf import GGUFReader

    fields = GGUFReader(str(path)).fields

    def strings(name: str) -> list[str]:
        f = fields[name]
        return [bytes(f.parts[i]).decode("utf-8") for i in f.data]

    def scalar(name: str) -> Any:
        f = fields.get(name)
        return None if f is None else f.parts[f.data[0]].tolist()[0]

    types = fields["tokenizer.ggml.token_type"]
    template = fields.get("tokenizer.chat_template")
    return {
        "tokens": strings("tokenizer.ggml.tokens"),
        "token_types": [int(types.parts[i][0]) for i in types.data],
        "merges": strings("tokenizer.ggml.merges"),
        "bos_id": scalar("tokenizer.ggml.bos_token_id"),
        "eos_id": scalar("tokenizer.ggml.eos_token_id"),
        "pad_id": scalar("tokenizer.ggml.padding_token_id"),
        "chat_template": None if template is None else bytes(template.parts[template.data[0]]).decode("utf-8"),
    }


@pytest.fixture(scope="session")
def qwen(gguf_fields: dict[str, Any]) -> Tokenizer:
    f = gguf_fields
    obj, config = tokenizer_json_from_gguf(
        f["tokens"], f["token_types"], f["merges"],
        bos_id=f["bos_id"], eos_id=f["eos_id"], pad_id=f["pad_id"], chat_template=f["chat_template"],
    )
    return Tokenizer.from_tokenizer_json(obj, config)


@pytest.fixture(scope="session")
def reference_dir(gguf_fields: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """vocab.json + merges.txt + tokenizer_config.json written straight from the GGUF fields, without
    our code: transformers builds its official Qwen2 pipeline (with NFC) from these slow-tokenizer
    files. (Its GGUF loader would drop NFC, so it is not used.)"""
    f = gguf_fields
    out = tmp_path_factory.mktemp("hf_reference")
    kinds = f["token_types"]
    vocab = {t: i for i, t in enumerate(f["tokens"]) if kinds[i] == 1}
    (out / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(f["merges"]) + "\n", encoding="utf-8")
    added = {
        str(i): {"content": t, "special": kinds[i] == 3, "normalized": False, "lstrip": False, "rstrip": False,
                 "single_word": False}
        for i, t in enumerate(f["tokens"]) if kinds[i] in (3, 4)
    }
    config = {"added_tokens_decoder": added, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
              "bos_token": None, "unk_token": None, "tokenizer_class": "Qwen2Tokenizer", "errors": "replace",
              "clean_up_tokenization_spaces": False, "add_prefix_space": False, "split_special_tokens": False}
    (out / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    return out


@pytest.fixture(scope="session")
def reference(reference_dir: Path) -> Any:
    """transformers' Qwen2 tokenizer (HF default: added-token strings in text are parsed)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(reference_dir))
    assert tok.backend_tokenizer.normalizer is not None, "reference must include NFC"
    return tok


@pytest.fixture(scope="session")
def reference_split(reference_dir: Path) -> Any:
    """The same with split_special_tokens=True (special-token strings in text stay plain text)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(reference_dir), split_special_tokens=True)
