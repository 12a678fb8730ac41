"""Chat conversations -> text (the checkpoint's Jinja template) -> token ids (+ SFT loss mask).

The safety rule of this module: control-token ids appear only where the *template* put them. A user
(or a tool result, or a tool schema) containing the text "<|im_end|>" gets that text tokenised as
plain characters, so it cannot close its turn and forge a system or assistant message. HF's
`apply_chat_template(tokenize=True)` does not guarantee this (transformers#29279).

How: before rendering, every added-token string inside the data is swapped for a random placeholder;
after rendering, the remaining added-token strings can only come from the template and are mapped to
their ids, while each run of ordinary text gets its placeholders swapped back and is encoded as
plain text. (A template that measures or slices message text would see the placeholders; the Qwen
templates only concatenate it.)
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from qwen2.tokenizer.template import ChatTemplateError, RenderBudget, render

if TYPE_CHECKING:
    from qwen2.tokenizer.bpe import Tokenizer

__all__ = [
    "CHATML_TEMPLATE",
    "ChatTemplateError",
    "RenderBudget",
    "encode_chat",
    "encode_chat_with_mask",
    "render_chat",
]

ROLES = ("system", "user", "assistant", "tool")

# Qwen2-Instruct's ChatML: a default system turn unless the conversation starts with one
# (Qwen2.5 checkpoints carry their own template with tools and a different default prompt).
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message.role != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}"
    "<|im_start|>{{ message.role }}\n{{ message.content }}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

_MAX_DEPTH = 32


def _plain(value: Any, where: str, depth: int = 0) -> Any:
    """A copy of `value` made only of JSON types (str subclasses etc. reduced to the base type).

    The sandbox vets attribute access, but an arbitrary object's methods are still callable from a
    template; rebuilding inputs from plain types keeps anything but data out of its reach.
    """
    if depth > _MAX_DEPTH:
        raise ValueError(f"{where}: nested deeper than {_MAX_DEPTH} levels")
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, bool):
        return bool(value)
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return float(value)
    if isinstance(value, Mapping):
        out = {}
        for key, item in value.items():
            if not isinstance(key, str):
                raise ValueError(f"{where}: keys must be strings, got {key!r}")
            out[str.__str__(key)] = _plain(item, f"{where}[{key!r}]", depth + 1)
        return out
    if isinstance(value, (list, tuple)):
        return [_plain(item, f"{where}[{i}]", depth + 1) for i, item in enumerate(value)]
    raise ValueError(f"{where}: unsupported type {type(value).__name__} (use str, numbers, bool, None, dict, list)")


def _check_messages(messages: Any) -> None:
    if not isinstance(messages, (list, tuple)) or not messages:
        raise ValueError("messages must be a non-empty list of {'role': ..., 'content': ...} dicts")
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise ValueError(f"messages[{i}]: expected a dict, got {type(message).__name__}")
        role = message.get("role")
        if role not in ROLES:
            raise ValueError(f"messages[{i}]: role must be one of {ROLES}, got {role!r}")
        content = message.get("content")
        tool_calls = message.get("tool_calls")
        if tool_calls is not None:
            if role != "assistant":
                raise ValueError(f"messages[{i}]: only assistant messages may have tool_calls")
            if not isinstance(tool_calls, (list, tuple)) or not all(isinstance(c, Mapping) for c in tool_calls):
                raise ValueError(f"messages[{i}]: tool_calls must be a list of dicts")
            for j, call in enumerate(tool_calls):
                function = call.get("function", call)
                if not (isinstance(function, Mapping) and isinstance(function.get("name"), str)):
                    raise ValueError(f"messages[{i}].tool_calls[{j}]: needs a function name (str)")
            if content is not None and not isinstance(content, str):
                raise ValueError(f"messages[{i}] ({role}): content must be a string or None")
        elif not isinstance(content, str):
            raise ValueError(f"messages[{i}] ({role}): content must be a string, got {type(content).__name__}")


def _context(
    messages: Any, tools: Any, add_generation_prompt: bool, extra: dict[str, Any], template: str | None
) -> tuple[str, dict[str, Any]]:
    _check_messages(messages)
    if tools is not None and not (isinstance(tools, (list, tuple)) and all(isinstance(t, Mapping) for t in tools)):
        raise ValueError("tools must be a list of JSON-schema dicts")
    if template is None:
        if tools:
            raise ValueError("the built-in ChatML template has no tool support; pass the checkpoint's template")
        template = CHATML_TEMPLATE
    elif not isinstance(template, str):
        raise ValueError(f"template must be a string or None, got {type(template).__name__}")
    context = {key: _plain(value, key) for key, value in extra.items()}
    context.update(
        messages=_plain(list(messages), "messages"),
        tools=_plain(list(tools), "tools") if tools is not None else None,
        add_generation_prompt=bool(add_generation_prompt),
    )
    return template, context


def render_chat(
    messages: list[dict[str, Any]],
    *,
    template: str | None,
    add_generation_prompt: bool = False,
    tools: list[dict[str, Any]] | None = None,
    budget: RenderBudget | None = None,
    **extra: Any,
) -> str:
    """The conversation as text, rendered by `template` (None: built-in Qwen2 ChatML).

    Same text as transformers' `apply_chat_template(..., tokenize=False)` for the same template.
    `extra` is passed to the template (e.g. `enable_thinking=False`). Raises ValueError for malformed
    messages and ChatTemplateError (a ValueError) if the template fails, is unsafe, or exceeds `budget`.
    """
    template, context = _context(messages, tools, add_generation_prompt, extra, template)
    return render(template, context, budget)


def _neutralize(value: Any, pattern: re.Pattern[str], placeholder: dict[str, str]) -> Any:
    """Replace every added-token string inside the (plain) data by its placeholder."""
    if isinstance(value, str):
        return pattern.sub(lambda m: placeholder[m.group()], value)
    if isinstance(value, dict):
        return {_neutralize(k, pattern, placeholder): _neutralize(v, pattern, placeholder) for k, v in value.items()}
    if isinstance(value, list):
        return [_neutralize(v, pattern, placeholder) for v in value]
    return value


def _added_pattern(names: Mapping[str, int]) -> re.Pattern[str]:
    return re.compile("|".join(re.escape(n) for n in sorted(names, key=len, reverse=True)))


def encode_chat(
    tokenizer: Tokenizer,
    messages: list[dict[str, Any]],
    *,
    add_generation_prompt: bool,
    tools: list[dict[str, Any]] | None = None,
    budget: RenderBudget | None = None,
    **extra: Any,
) -> list[int]:
    """Token ids of the conversation rendered with the tokenizer's chat template (or ChatML).

    `tokenizer.decode(ids)` equals `render_chat(...)`; control ids occur only where the template
    wrote them, never from message content, tool schemas or `extra` values.
    """
    template, context = _context(messages, tools, add_generation_prompt, extra, tokenizer.chat_template)
    added = tokenizer.added_tokens
    if not added:
        return tokenizer.encode(render(template, context, budget))
    pattern = _added_pattern(added)
    # A fresh random nonce per call: content cannot contain a placeholder it cannot predict.
    nonce = secrets.token_hex(8)
    placeholder = {name: f"\ue000{nonce}{i}\ue001" for i, name in enumerate(added)}
    restore = {p: name for name, p in placeholder.items()}
    restore_pattern = re.compile(f"\ue000{nonce}\\d+\ue001")

    def unmask(text: str) -> str:
        return restore_pattern.sub(lambda m: restore.get(m.group(), m.group()), text)

    rendered = render(template, _neutralize(context, pattern, placeholder), budget)
    ids: list[int] = []
    start = 0
    for match in pattern.finditer(rendered):  # what is left of added-token text came from the template
        if match.start() > start:
            ids += tokenizer.encode(unmask(rendered[start : match.start()]))
        ids.append(added[match.group()])
        start = match.end()
    if start < len(rendered):
        ids += tokenizer.encode(unmask(rendered[start:]))
    return ids


def encode_chat_with_mask(
    tokenizer: Tokenizer,
    messages: list[dict[str, Any]],
    *,
    add_generation_prompt: bool = False,
    tools: list[dict[str, Any]] | None = None,
    budget: RenderBudget | None = None,
    **extra: Any,
) -> tuple[list[int], list[int]]:
    """(ids, loss_mask) for SFT: loss_mask is 1 on the tokens of every assistant turn's body -- its
    content and tool calls -- including the closing <|im_end|>, and 0 elsewhere (system, user, tool
    turns, the "<|im_start|>assistant\\n" header, the newline after <|im_end|>, a generation prompt).

    Turns are found from the ChatML control tokens, which only the template can place. A token that
    straddles the header and the content (e.g. "\\n\\n" when content starts with a newline) counts as
    content. Raises ValueError if the vocabulary has no <|im_start|>/<|im_end|>.
    """
    ids = encode_chat(
        tokenizer, messages, add_generation_prompt=add_generation_prompt, tools=tools, budget=budget, **extra
    )
    im_start, im_end = tokenizer.token_to_id("<|im_start|>"), tokenizer.token_to_id("<|im_end|>")
    if im_start is None or im_end is None:
        raise ValueError("encode_chat_with_mask needs a ChatML vocabulary (<|im_start|>, <|im_end|>)")
    header = b"assistant\n"
    mask = [0] * len(ids)
    i = 0
    while i < len(ids):
        if ids[i] != im_start:
            i += 1
            continue
        end = i + 1
        while end < len(ids) and ids[end] not in (im_end, im_start):
            end += 1
        closed = end < len(ids) and ids[end] == im_end
        body = tokenizer.decode_bytes(ids[i + 1 : end])
        if closed and body.startswith(header):
            offset = 0
            for k in range(i + 1, end):
                offset += len(tokenizer.decode_bytes([ids[k]]))
                if offset > len(header):
                    mask[k] = 1
            mask[end] = 1
        i = end if not closed else end + 1
    return ids, mask
