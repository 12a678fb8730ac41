"""TextAssembler: completion token ids -> text chunks, with stop strings held back and cut.

Shared by the single-stream TextStream and the batching engine, so both emit exactly the same
text for the same tokens: only whole UTF-8 characters, never any part of a matched stop string,
and text that could still become a stop string is held until it cannot.
"""

from __future__ import annotations

from qwen2.tokenizer import StreamDecoder, Tokenizer


class TextAssembler:
    def __init__(self, tokenizer: Tokenizer, stop: tuple[str, ...] = ()) -> None:
        self._decoder = StreamDecoder(tokenizer, skip_special=True)
        self._stop = stop
        self._hold = max((len(s) for s in stop), default=1) - 1
        self._pending = ""  # decoded text not yet emitted
        self.text = ""  # everything emitted so far
        self.stopped = False  # a stop string matched; push() must not be called again

    def push(self, token: int) -> str:
        """Add one completion token; return the text that is now safe to emit (maybe "")."""
        self._pending += self._decoder.push(token)
        if self._cut():
            return self._emit(len(self._pending))
        return self._emit(len(self._pending) - self._hold)

    def finish(self) -> str:
        """The stream ended (stop id, length, cancel): flush what was held back."""
        if not self.stopped:
            self._pending += self._decoder.flush()
            self._cut()
        return self._emit(len(self._pending))

    def _cut(self) -> bool:
        hits = [i for i in (self._pending.find(s) for s in self._stop) if i >= 0]
        if hits:
            self._pending, self.stopped = self._pending[:min(hits)], True
        return self.stopped

    def _emit(self, n: int) -> str:
        if n <= 0:
            return ""
        chunk, self._pending = self._pending[:n], self._pending[n:]
        self.text += chunk
        return chunk
