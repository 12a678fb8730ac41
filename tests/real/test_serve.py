"""`qwen2 serve` on the demo model with int4 weights, spoken to with the official `openai` client:
a correct answer, streaming, stop strings, usage, concurrent requests, and a clean shutdown."""

from __future__ import annotations

import concurrent.futures
import json
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import openai
import pytest


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(demo_path):
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "qwen2", "serve", "--model", str(demo_path), "--quantize", "int4",
                             "--port", str(port), "--api-key", "sk-real", "--served-model-name", "demo",
                             "--log-level", "warning"], stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                if r.status == 200:
                    break
        except OSError:
            pass
        if proc.poll() is not None or time.time() > deadline:
            proc.kill()
            pytest.fail(f"qwen2 serve did not start: {proc.stderr.read()}")
        time.sleep(0.5)
    yield openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="sk-real", max_retries=0, timeout=300)
    proc.send_signal(signal.SIGTERM)
    try:
        # uvicorn shuts down gracefully, then re-raises the signal so the exit status says SIGTERM
        assert proc.wait(timeout=30) in (0, -signal.SIGTERM)
        assert "Traceback" not in proc.stderr.read()
    finally:
        proc.kill()


def test_chat_answers_correctly_with_usage(server):
    reply = server.chat.completions.create(
        model="demo", temperature=0, max_tokens=20,
        messages=[{"role": "user", "content": "What is 12 * 12? Reply with only the number."}])
    assert "144" in reply.choices[0].message.content
    assert reply.choices[0].finish_reason == "stop"
    assert reply.usage.prompt_tokens > 10 and 0 < reply.usage.completion_tokens <= 20


def test_streaming_with_a_stop_string(server):
    messages = [{"role": "user", "content": "Write a Python function is_prime(n) that checks whether n is prime."}]
    chunks = list(server.chat.completions.create(model="demo", messages=messages, temperature=0, max_tokens=200,
                                                 stop=["return True"], stream=True,
                                                 stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert "def is_prime" in text and "return True" not in text
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["stop"]
    assert chunks[-1].usage.completion_tokens > 10


def test_concurrent_requests_equal_sequential_ones(server):
    questions = [f"What is {a} + {b}? Reply with only the number." for a, b in [(2, 3), (10, 7), (21, 21), (9, 9)]]

    def ask(q: str) -> str:
        return server.chat.completions.create(model="demo", temperature=0, max_tokens=12,
                                              messages=[{"role": "user", "content": q}]).choices[0].message.content

    sequential = [ask(q) for q in questions]
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        concurrent_ = list(pool.map(ask, questions))
    assert [s.strip() for s in sequential] == ["5", "17", "42", "18"]
    assert concurrent_ == sequential


def test_the_model_calls_a_tool(server):
    tools = [{"type": "function", "function": {
        "name": "get_weather", "description": "Current weather of a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]
    messages = [{"role": "user", "content": "What is the weather in Paris right now?"}]
    reply = server.chat.completions.create(model="demo", temperature=0, max_tokens=60, messages=messages,
                                           tools=tools)
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls", choice.message
    (call,) = choice.message.tool_calls
    assert call.function.name == "get_weather"
    assert "paris" in json.loads(call.function.arguments)["city"].lower()
    # the result goes back as a tool message; the model answers from it
    messages += [{"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
                 {"role": "tool", "tool_call_id": call.id, "content": '{"temperature_c": 21, "sky": "sunny"}'}]
    answer = server.chat.completions.create(model="demo", temperature=0, max_tokens=60, messages=messages,
                                            tools=tools)
    assert answer.choices[0].finish_reason == "stop"
    assert "21" in answer.choices[0].message.content
