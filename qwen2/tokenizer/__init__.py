"""Qwen2 tokenizer: byte-level BPE (`Tokenizer`), streaming decode, and ChatML chat rendering."""

from qwen2.tokenizer.bpe import Tokenizer
from qwen2.tokenizer.chat import encode_chat, encode_chat_with_mask, render_chat
from qwen2.tokenizer.stream import StreamDecoder
from qwen2.tokenizer.vocab import tokenizer_json_from_gguf

__all__ = [
    "StreamDecoder",
    "Tokenizer",
    "encode_chat",
    "encode_chat_with_mask",
    "render_chat",
    "tokenizer_json_from_gguf",
]
