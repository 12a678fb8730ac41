"""The OpenAI-compatible server on a tiny random model: the official `openai` client, streaming,
stop strings, usage, n/seed, API keys, a full queue, disconnects, and every kind of bad request."""

from __future__ import annotations

import copy
import dataclasses
import http.client
import json
import threading
import time

import openai
import pytest

from qwen2.inference import SamplingParams, generate_ids
from qwen2.inference.engine import EngineConfig
from qwen2.tokenizer import encode_chat
from live_server import API_KEY, live_server, wait_until

MESSAGES = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Say something."}]


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.base_url, api_key=API_KEY, max_retries=0, timeout=60)


def _greedy_reference(pretrained, prompt_ids: list[int], max_new: int) -> list[int]:
    ids = []
    for (token,) in generate_ids(pretrained.model, [prompt_ids], SamplingParams(max_new_tokens=max_new),
                                 stop_ids=pretrained.stop_ids, num_valid_tokens=pretrained.tokenizer.vocab_size):
        if token is None or token in pretrained.stop_ids:
            break
        ids.append(token)
    return ids


def test_chat_completion_matches_the_reference_generator(client, tiny_pretrained):
    reply = client.chat.completions.create(model="tiny-qwen2", messages=MESSAGES, max_tokens=20, temperature=0)
    prompt = encode_chat(tiny_pretrained.tokenizer, MESSAGES, add_generation_prompt=True)
    expected = _greedy_reference(tiny_pretrained, prompt, 20)
    choice = reply.choices[0]
    assert choice.message.role == "assistant"
    assert choice.message.content == tiny_pretrained.tokenizer.decode(expected, skip_special=True)
    assert choice.finish_reason == ("length" if len(expected) == 20 else "stop")
    assert reply.usage.prompt_tokens == len(prompt)
    assert reply.usage.completion_tokens == len(expected)
    assert reply.usage.total_tokens == len(prompt) + len(expected)
    assert reply.object == "chat.completion" and reply.id.startswith("chatcmpl-")


def test_streaming_equals_non_streaming(client):
    kwargs = dict(model="tiny-qwen2", messages=MESSAGES, max_tokens=24, temperature=0)
    whole = client.chat.completions.create(**kwargs).choices[0].message.content
    chunks = list(client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kwargs))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finishes) == 1  # exactly one finish_reason per choice
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens > 0


def test_stop_strings(client):
    kwargs = dict(model="tiny-qwen2", messages=MESSAGES, max_tokens=30, temperature=0)
    free = client.chat.completions.create(**kwargs).choices[0].message.content
    stop = free[6:8]
    cut = client.chat.completions.create(stop=[stop], **kwargs).choices[0]
    assert cut.finish_reason == "stop" and cut.message.content == free[:free.index(stop)]
    streamed = "".join(c.choices[0].delta.content or "" for c in
                       client.chat.completions.create(stop=stop, stream=True, **kwargs) if c.choices)
    assert streamed == cut.message.content


def test_completions_n_seed_and_echo(client, tiny_pretrained):
    one = client.completions.create(model="tiny-qwen2", prompt="Once upon", max_tokens=8, temperature=1.0, seed=7,
                                    n=3)
    again = client.completions.create(model="tiny-qwen2", prompt="Once upon", max_tokens=8, temperature=1.0, seed=7,
                                      n=3)
    assert [c.text for c in one.choices] == [c.text for c in again.choices]  # seeded: reproducible
    assert len({c.text for c in one.choices}) > 1  # but the n choices differ
    assert [c.index for c in one.choices] == [0, 1, 2]
    assert one.usage.prompt_tokens == len(tiny_pretrained.tokenizer.encode("Once upon"))
    echoed = client.completions.create(model="tiny-qwen2", prompt=["ab", "cd"], max_tokens=4, temperature=0,
                                       echo=True)
    assert [c.text[:2] for c in echoed.choices] == ["ab", "cd"]
    by_ids = client.completions.create(model="tiny-qwen2", prompt=[97, 98], max_tokens=4, temperature=0)
    assert by_ids.choices[0].text == echoed.choices[0].text[2:]
    streamed = list(client.completions.create(model="tiny-qwen2", prompt="ab", max_tokens=4, temperature=0,
                                              stream=True))
    assert "".join(c.choices[0].text for c in streamed) == by_ids.choices[0].text


def test_models_and_health(client, server):
    assert [m.id for m in client.models.list().data] == ["tiny-qwen2"]
    status, body = server.request("GET", "/health", key=None)
    assert status == 200 and body["status"] == "ok" and body["kv_bytes_per_token"] > 0


def test_api_key_is_required(server):
    bad = openai.OpenAI(base_url=server.base_url, api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.chat.completions.create(model="tiny-qwen2", messages=MESSAGES, max_tokens=2)
    status, body = server.request("GET", "/v1/models", key=None)
    assert status == 401 and body["error"]["code"] == "invalid_api_key"


@pytest.mark.parametrize("body,status,fragment,param", [
    (b"{not json", 400, "not valid JSON", None),
    (b"\xff\xfe{}", 400, "not valid JSON", None),
    (b"[1, 2]", 400, "JSON object", None),
    ({"messages": MESSAGES, "max_tokens": "ten"}, 400, "max_tokens", "max_tokens"),
    ({"messages": MESSAGES, "temperature": -1}, 400, "temperature", "temperature"),
    ({"messages": MESSAGES, "n": 0}, 400, "n", "n"),
    ({"messages": MESSAGES, "stop": ["a", "b", "c", "d", "e"]}, 400, "stop", "stop"),
    ({"messages": "hello"}, 400, "messages", "messages"),
    ({"max_tokens": 5}, 400, "messages", "messages"),
    ({"messages": [{"role": "wizard", "content": "hi"}]}, 400, "role", "messages"),
    ({"messages": MESSAGES, "chat_template": "{{ 7 * 7 }}"}, 400, "template", "chat_template"),
    ({"messages": [{"role": "user", "content": "x" * 400}]}, 400, "context length", "messages"),
    ({"messages": MESSAGES, "max_tokens": 100000}, 400, "context length", "max_tokens"),
    ({"messages": MESSAGES, "logprobs": True}, 400, "logprobs", "logprobs"),
])
def test_bad_chat_requests_get_openai_errors(server, body, status, fragment, param):
    got, reply = server.request("POST", "/v1/chat/completions", body)
    assert got == status
    error = reply["error"]
    assert fragment.lower() in error["message"].lower()
    assert error["type"] == "invalid_request_error" and error["param"] == param
    if "context length" in fragment:
        assert error["code"] == "context_length_exceeded"


@pytest.mark.parametrize("body,fragment", [
    ({"prompt": []}, "prompt"),
    ({"prompt": [[1, 2], "x"]}, "prompt"),
    ({"prompt": [100000]}, "token ids"),
    ({"prompt": ""}, "empty"),
    ({"prompt": "hi", "echo": "yes"}, "echo"),
])
def test_bad_completion_requests_get_openai_errors(server, body, fragment):
    got, reply = server.request("POST", "/v1/completions", body)
    assert got == 400 and fragment in reply["error"]["message"]


def test_unknown_fields_are_ignored_and_unknown_routes_are_404(server):
    status, reply = server.request("POST", "/v1/chat/completions",
                                   {"messages": MESSAGES, "max_tokens": 2, "user": "u1", "metadata": {"a": 1}})
    assert status == 200 and reply["choices"][0]["message"]["role"] == "assistant"
    status, reply = server.request("GET", "/v1/nothing")
    assert status == 404 and "error" in reply


def test_oversized_body_is_413(tiny_pretrained):
    with live_server(tiny_pretrained, max_body_bytes=1000) as live:
        status, reply = live.request("POST", "/v1/chat/completions",
                                     {"messages": [{"role": "user", "content": "x" * 2000}]})
    assert status == 413 and "limit" in reply["error"]["message"]


def test_full_queue_is_429_and_waiting_requests_still_finish(tiny_pretrained):
    with live_server(tiny_pretrained, EngineConfig(max_queue=1), start_engine=False) as live:
        results = {}

        def first():
            results["first"] = live.request("POST", "/v1/completions", {"prompt": "ab", "max_tokens": 3})

        thread = threading.Thread(target=first)
        thread.start()
        assert wait_until(lambda: live.engine.stats()["waiting"] == 1)
        status, reply = live.request("POST", "/v1/completions", {"prompt": "cd", "max_tokens": 3})
        assert status == 429 and reply["error"]["type"] == "rate_limit_error"
        live.engine.start()
        thread.join(timeout=30)
        assert results["first"][0] == 200


@pytest.fixture
def slow_pretrained(tiny_pretrained):
    """The tiny model with a long context and 5 ms per forward: a long generation takes seconds."""
    model = copy.deepcopy(tiny_pretrained.model)
    model.config = dataclasses.replace(model.config, max_position_embeddings=4096)
    model.register_forward_hook(lambda *_: time.sleep(0.005))
    return dataclasses.replace(tiny_pretrained, model=model)


def test_client_disconnect_cancels_generation_and_frees_blocks(slow_pretrained):
    with live_server(slow_pretrained, EngineConfig(block_size=8, prefix_caching=False)) as live:
        conn = http.client.HTTPConnection("127.0.0.1", live.port, timeout=30)
        body = {"messages": MESSAGES, "max_tokens": 3000, "temperature": 0, "stream": True}
        conn.request("POST", "/v1/chat/completions", body=json.dumps(body),
                     headers={"Content-Type": "application/json"})
        response = conn.getresponse()
        assert response.status == 200
        assert response.readline().startswith(b"data: ")
        assert wait_until(lambda: live.engine.stats()["kv_blocks_used"] > 0)
        conn.sock.close()  # the client goes away mid-stream
        conn.close()
        assert wait_until(lambda: live.engine.stats()["running"] == 0 and live.engine.stats()["kv_blocks_used"] == 0,
                          timeout=2)
        assert live.engine.steps < 1000  # cancelled long before max_tokens
        # the server is still fine for the next client
        status, reply = live.request("POST", "/v1/completions", {"prompt": "ab", "max_tokens": 2})
        assert status == 200
