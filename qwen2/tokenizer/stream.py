"""Incremental detokenisation for streaming generation.

A byte-level token can end in the middle of a UTF-8 character (an emoji or CJK character is often
split over 2-4 tokens), so decoding token by token would emit U+FFFD garbage. `StreamDecoder` holds
back an incomplete trailing sequence until the bytes that complete it arrive.
"""

from __future__ import annotations

import codecs
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from qwen2.tokenizer.bpe import Tokenizer


class StreamDecoder:
    """Feed ids one at a time; get back only complete text.

    Contract: the concatenation of every `push` result followed by `flush()` equals
    `tokenizer.decode(all_ids, skip_special=skip_special)`. Bytes that can never become valid UTF-8
    are emitted as U+FFFD as soon as that is certain, exactly as `decode` would.
    """

    def __init__(self, tokenizer: Tokenizer, *, skip_special: bool = False) -> None:
        self._tokenizer = tokenizer
        self._skip_special = skip_special
        # The stdlib incremental decoder buffers at most 3 bytes of an unfinished character and uses the
        # same replacement rules as bytes.decode(errors="replace"), which is what the contract needs.
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token_id: int) -> str:
        """Add one token id; return the text it completes (possibly ""). ValueError for unknown ids."""
        raw = self._tokenizer.decode_bytes([token_id], skip_special=self._skip_special)
        return self._utf8.decode(raw, final=False)

    def flush(self) -> str:
        """End of stream: return whatever is buffered (an unfinished character becomes U+FFFD) and reset."""
        text = self._utf8.decode(b"", final=True)
        self._utf8.reset()
        return text
