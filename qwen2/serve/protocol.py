"""OpenAI API request schemas (the fields this server understands) and the error body.

Known fields are type-checked strictly enough that a wrong type is a 400 naming the field, not a
500 later. Unknown fields are ignored, as OpenAI-compatible servers do: clients send fields a
server does not know (e.g. `user`, `metadata`). Extras in vLLM's style (top_k, min_p,
repetition_penalty) are accepted because Qwen2's generation_config uses them.
"""

from __future__ import annotations

from typing import Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr, field_validator

Number = Union[StrictInt, StrictFloat]


class APIError(Exception):
    """An error with an HTTP status and OpenAI's error object."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: StrictStr | None = None
    max_tokens: StrictInt | None = Field(default=None, ge=1)
    temperature: Number | None = Field(default=None, ge=0, le=2)
    top_p: Number | None = Field(default=None, gt=0, le=1)
    top_k: StrictInt | None = Field(default=None, ge=-1)
    min_p: Number | None = Field(default=None, ge=0, lt=1)
    repetition_penalty: Number | None = Field(default=None, gt=0)
    presence_penalty: Number | None = Field(default=None, ge=-2, le=2)
    frequency_penalty: Number | None = Field(default=None, ge=-2, le=2)
    n: StrictInt = Field(default=1, ge=1, le=16)
    seed: StrictInt | None = None
    stop: StrictStr | list[StrictStr] | None = None
    stream: StrictBool = False
    stream_options: dict[str, Any] | None = None
    logprobs: Any = None

    @field_validator("stop")
    @classmethod
    def _stops(cls, value: str | list[str] | None) -> list[str]:
        stops = [value] if isinstance(value, str) else list(value or [])
        if len(stops) > 4:
            raise ValueError("at most 4 stop sequences")
        if any(not s for s in stops):
            raise ValueError("stop sequences must be non-empty")
        return stops

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.get("include_usage"))


class TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["text"]
    text: StrictStr


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant", "tool"]
    content: StrictStr | list[TextPart] | None = None
    name: StrictStr | None = None
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: StrictStr | None = None

    def to_template(self) -> dict[str, Any]:
        """The message as the chat template sees it (text parts joined)."""
        content = self.content
        if isinstance(content, list):
            content = "".join(part.text for part in content)
        message: dict[str, Any] = {"role": self.role, "content": content}
        if self.role != "assistant" and content is None:
            message["content"] = ""
        for key in ("name", "tool_calls", "tool_call_id"):
            if getattr(self, key) is not None:
                message[key] = getattr(self, key)
        return message


class ChatCompletionRequest(_Request):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: StrictInt | None = Field(default=None, ge=1)
    tools: list[dict[str, Any]] | None = None
    # "auto": the model may call the tools (qwen2.serve.tools reads its calls); "none": the tools are
    # not shown to it. Forcing a call ("required", a named function) needs constrained decoding,
    # which this server does not do: refused with a 400 rather than silently not honoured.
    tool_choice: Literal["none", "auto"] | None = None
    chat_template: Any = None  # refused: a request may not supply a template (it would run server-side)

    @field_validator("tool_choice", mode="before")
    @classmethod
    def _tool_choice(cls, value: Any) -> Any:
        if value == "required" or isinstance(value, dict):
            raise ValueError("forcing a tool call ('required' or a named function) is not supported; use 'auto'")
        return value

    @property
    def calls_tools(self) -> bool:
        return bool(self.tools) and self.tool_choice != "none"

    @property
    def tool_names(self) -> frozenset[str]:
        names = (tool.get("function", {}).get("name") for tool in self.tools or [] if isinstance(tool.get("function"), dict))
        return frozenset(name for name in names if isinstance(name, str))

    @property
    def token_limit(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


class CompletionRequest(_Request):
    prompt: StrictStr | list[StrictStr] | list[StrictInt] | list[list[StrictInt]]
    echo: StrictBool = False
    suffix: StrictStr | None = None

    @property
    def token_limit(self) -> int | None:
        return self.max_tokens if self.max_tokens is not None else 16  # OpenAI's default for completions

    @field_validator("prompt")
    @classmethod
    def _non_empty(cls, value: Any) -> Any:
        if isinstance(value, list) and not value:
            raise ValueError("prompt must not be an empty list")
        return value


def validation_message(errors: list[dict[str, Any]]) -> tuple[str, str | None]:
    """One readable line and the offending field for a pydantic ValidationError's errors()."""
    first = errors[0]
    loc = [str(p) for p in first.get("loc", ()) if not str(p).startswith(("function-", "constrained-"))]
    # pydantic reports every member of a union; the field path is the part the user wrote
    param = loc[0] if loc else None
    where = ".".join(loc) if loc else "body"
    return f"{where}: {first.get('msg', 'invalid value')}", param
