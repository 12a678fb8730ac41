"""Shared fixture for fast tests: a byte-level tokenizer (stand-in models live in stand_ins.py)."""

from __future__ import annotations

import pytest

from qwen2.tokenizer import Tokenizer
from tokenizer_tiny import tiny_tokenizer_json

BYTE_ADDED = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


@pytest.fixture(scope="session")
def byte_tokenizer() -> Tokenizer:
    """Qwen2's pipeline with no merges: every byte is one token (ids 0-255), then the 3 control tokens."""
    tokenizer_json = tiny_tokenizer_json(words=[], added=[(content, True) for content in BYTE_ADDED])
    return Tokenizer.from_tokenizer_json(tokenizer_json, {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"})
