"""Tool calls: the Hermes blocks Qwen2.5 writes become OpenAI `tool_calls`, whole and streamed,
read back by the official `openai` client."""

from __future__ import annotations

import json

import openai
import pytest

from live_server import live_server
from qwen2.checkpoint.loader import Pretrained
from qwen2.inference.engine import EngineConfig
from qwen2.serve.tools import ToolCallStream, split_tool_calls
from qwen2.tokenizer import Tokenizer
from stand_ins import ScriptedModel
from tokenizer_tiny import tiny_tokenizer_json

CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "°C"}}\n</tool_call>'
TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Current weather of a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "unit": {"type": "string"}},
                   "required": ["city"]}}}]
# A small template in the shape of Qwen2.5's: the tools go into the system turn as JSON.
BYTE_ADDED = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]  # ids 256-258, as in tests/conftest.py
TEMPLATE = (
    "{%- if tools %}<|im_start|>system\nYou may call these tools:\n{%- for tool in tools %}\n{{ tool | tojson }}"
    "{%- endfor %}<|im_end|>\n{%- endif %}"
    "{%- for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{%- endfor %}"
    "{%- if add_generation_prompt %}<|im_start|>assistant\n{%- endif %}")


def test_split_whole_replies():
    content, calls = split_tool_calls("Checking.\n" + CALL + "\n" + CALL.replace("Paris", "Oslo"))
    assert content == "Checking."
    assert [c["function"]["name"] for c in calls] == ["get_weather", "get_weather"]
    assert [json.loads(c["function"]["arguments"])["city"] for c in calls] == ["Paris", "Oslo"]
    assert all(c["type"] == "function" and c["id"].startswith("call_") for c in calls)
    assert len({c["id"] for c in calls}) == 2
    assert split_tool_calls(CALL)[0] is None  # only a call: no content
    assert split_tool_calls("no calls here") == ("no calls here", [])
    # not a valid call: left in the content as written
    bad = "<tool_call>\n{not json}\n</tool_call>"
    assert split_tool_calls(bad) == (bad, [])
    # a block cut off by max_tokens before its closing tag still parses if its JSON is whole
    assert split_tool_calls(CALL.removesuffix("</tool_call>"))[1][0]["function"]["name"] == "get_weather"


def test_a_bare_call_object_naming_a_tool_is_a_call():
    # what the demo model (Qwen2.5-Coder-0.5B-Instruct) writes when given a weather tool
    bare = '{"name": "get_weather", "arguments": {"city": "Paris"}}'
    content, calls = split_tool_calls(bare, frozenset({"get_weather"}))
    assert content is None and json.loads(calls[0]["function"]["arguments"]) == {"city": "Paris"}
    assert split_tool_calls(bare) == (bare, [])  # no such tool in the request: plain text
    assert split_tool_calls('{"name": "other", "arguments": {}}', frozenset({"get_weather"}))[1] == []
    stream = ToolCallStream(frozenset({"get_weather"}))
    assert "".join(stream.feed(bare[i:i + 4]) for i in range(0, len(bare), 4)) == ""  # held to the end
    assert stream.finish()[1][0]["function"]["name"] == "get_weather"
    json_answer = ToolCallStream(frozenset({"get_weather"}))  # a JSON reply that is not a call
    assert json_answer.feed('{"a": 1}') == "" and json_answer.finish() == ('{"a": 1}', [])


@pytest.mark.parametrize("step", [1, 2, 5, 50])
def test_stream_holds_back_only_what_may_be_a_call(step):
    text = "Let me look <tool that up.\n" + CALL
    stream = ToolCallStream()
    sent = "".join(stream.feed(text[i:i + step]) for i in range(0, len(text), step))
    rest, calls = stream.finish()
    assert sent + rest == "Let me look <tool that up.\n"
    assert [json.loads(c["function"]["arguments"]) for c in calls] == [{"city": "Paris", "unit": "°C"}]
    plain = ToolCallStream()
    sent = "".join(plain.feed(c) for c in "ends with <tool_ca")
    assert sent + plain.finish()[0] == "ends with <tool_ca" and plain.finish() == ("", [])


@pytest.fixture(scope="module")
def tool_server():
    tokenizer = Tokenizer.from_tokenizer_json(
        tiny_tokenizer_json(words=[], added=[(content, True) for content in BYTE_ADDED]),  # as byte_tokenizer
        {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "chat_template": TEMPLATE})
    reply = "Sure.\n" + CALL
    model = ScriptedModel(list(reply.encode()) + [258], vocab_size=259, eos_token_id=258,
                          max_position_embeddings=4096)
    pretrained = Pretrained(model, tokenizer, {}, source="scripted")
    # one request at a time: the scripted model's script is shared by every sequence
    with live_server(pretrained, EngineConfig(max_batch_size=1, block_size=16)) as live:
        yield live, model


def test_openai_client_reads_tool_calls(tool_server):
    live, model = tool_server
    client = openai.OpenAI(base_url=live.base_url, api_key="unused", max_retries=0, timeout=60)
    messages = [{"role": "user", "content": "Weather in Paris?"}]

    model.calls = 0
    whole = client.chat.completions.create(model="tiny-qwen2", messages=messages, tools=TOOLS, temperature=0)
    choice = whole.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content == "Sure."
    (call,) = choice.message.tool_calls
    assert call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Paris", "unit": "°C"}

    model.calls = 0
    content, calls, finish = "", {}, None
    for chunk in client.chat.completions.create(model="tiny-qwen2", messages=messages, tools=TOOLS,
                                                temperature=0, stream=True):
        delta = chunk.choices[0].delta
        content += delta.content or ""
        for part in delta.tool_calls or []:
            entry = calls.setdefault(part.index, {"name": "", "arguments": ""})
            entry["name"] += part.function.name or ""
            entry["arguments"] += part.function.arguments or ""
        finish = chunk.choices[0].finish_reason or finish
        assert "<tool_call>" not in content  # the block never leaks into the streamed text
    assert finish == "tool_calls" and content.strip() == "Sure."
    assert calls[0]["name"] == "get_weather" and json.loads(calls[0]["arguments"])["city"] == "Paris"

    # without tools (or with tool_choice "none") the reply is plain text, as the model wrote it
    model.calls = 0
    plain = client.chat.completions.create(model="tiny-qwen2", messages=messages, temperature=0)
    assert plain.choices[0].message.content == "Sure.\n" + CALL and not plain.choices[0].message.tool_calls
    model.calls = 0
    plain = client.chat.completions.create(model="tiny-qwen2", messages=messages, tools=TOOLS,
                                           tool_choice="none", temperature=0)
    assert plain.choices[0].finish_reason == "stop" and not plain.choices[0].message.tool_calls


def test_forcing_a_tool_call_is_refused(tool_server):
    live, _ = tool_server
    client = openai.OpenAI(base_url=live.base_url, api_key="unused", max_retries=0, timeout=60)
    for choice in ("required", {"type": "function", "function": {"name": "get_weather"}}):
        with pytest.raises(openai.BadRequestError, match="not supported"):
            client.chat.completions.create(model="tiny-qwen2", messages=[{"role": "user", "content": "x"}],
                                           tools=TOOLS, tool_choice=choice)
