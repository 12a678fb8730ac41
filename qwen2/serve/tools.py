"""Function calls in the model's reply, as OpenAI's `tool_calls`.

Qwen2.5's chat template tells the model to answer a request it wants a tool for with one block per
call, `<tool_call>\n{"name": ..., "arguments": {...}}\n</tool_call>` (the Hermes format; Qwen's
docs and vLLM's `hermes` parser read the same). A reply is therefore free text, possibly followed by
call blocks. `split_tool_calls` turns a whole reply into (content, calls); `ToolCallStream` does the
same for a stream of text deltas, passing text through until a block may be starting and holding
everything after it for the end, so a client never sees half a call as content.

A block that is not a JSON object with a string "name" is left in the content as the model wrote
it: the client sees what came out rather than an error or a silently dropped call.

Small models often drop the tags: asked for the weather with a weather tool, the demo model
(Qwen2.5-Coder-0.5B-Instruct) answers with the bare object `{"name": "get_weather", "arguments":
{"city": "Paris"}}`. A reply that is exactly one such object, naming one of the request's tools,
is read as that call too.
"""

from __future__ import annotations

import json
import re
import secrets
from typing import Any

OPEN, CLOSE = "<tool_call>", "</tool_call>"
_BLOCK = re.compile(re.escape(OPEN) + r"\s*(.*?)\s*(?:" + re.escape(CLOSE) + r"|\Z)", re.DOTALL)


def _call(body: str) -> dict[str, Any] | None:
    try:
        data = json.loads(body)
    except json.JSONDecodeError:
        return None
    if not isinstance(data, dict) or not isinstance(data.get("name"), str):
        return None
    arguments = data.get("arguments", data.get("parameters", {}))
    # OpenAI sends arguments as a JSON string; a model that already wrote a string keeps it
    text = arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False)
    return {"id": f"call_{secrets.token_hex(12)}", "type": "function",
            "function": {"name": data["name"], "arguments": text}}


def split_tool_calls(text: str, tool_names: frozenset[str] = frozenset()) -> tuple[str | None, list[dict[str, Any]]]:
    """(content, tool calls) of a whole reply: the calls are the valid blocks, the content everything
    else (None when nothing else is left). A reply that is only a bare call object naming one of
    `tool_names` is that call."""
    if OPEN not in text:
        bare = _call(text.strip()) if text.lstrip().startswith("{") else None
        if bare is not None and bare["function"]["name"] in tool_names:
            return None, [bare]
        return text, []
    calls: list[dict[str, Any]] = []
    content, position = [], 0
    for match in _BLOCK.finditer(text):
        call = _call(match.group(1))
        if call is not None:
            content.append(text[position:match.start()])
            position = match.end()
            calls.append(call)
    if not calls:
        return text, []
    content.append(text[position:])
    joined = "".join(content).strip()
    return joined or None, calls


class ToolCallStream:
    """Feed text deltas; `feed` returns the content that is safe to send now, `finish` the rest of the
    content and the calls."""

    def __init__(self, tool_names: frozenset[str] = frozenset()) -> None:
        self._tool_names = tool_names
        self._pending = ""  # text that may be the start of OPEN, held back
        self._sent_any = False
        self._in_calls = False
        self._calls_text = ""

    def feed(self, delta: str) -> str:
        if self._in_calls:
            self._calls_text += delta
            return ""
        text = self._pending + delta
        start = text.find(OPEN)
        if start < 0 and not self._sent_any and text.lstrip().startswith("{"):
            start = 0  # may be a bare call object: hold the reply to the end (split_tool_calls decides)
        if start >= 0:
            self._in_calls, self._calls_text, self._pending = True, text[start:], ""
            return text[:start]
        # keep the longest tail that could still grow into OPEN
        keep = next((n for n in range(min(len(OPEN) - 1, len(text)), 0, -1) if OPEN.startswith(text[-n:])), 0)
        self._pending = text[len(text) - keep:]
        sent = text[:len(text) - keep]
        self._sent_any = self._sent_any or bool(sent.strip())
        return sent

    def finish(self) -> tuple[str, list[dict[str, Any]]]:
        """(content not yet sent, calls)."""
        if not self._in_calls:
            rest, self._pending = self._pending, ""
            return rest, []
        content, calls = split_tool_calls(self._calls_text, self._tool_names)
        if not calls:
            return self._calls_text, []
        return content or "", calls
