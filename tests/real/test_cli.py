"""The `qwen2` command end to end: one-shot and interactive chat on the demo model, and clear
errors on a small model directory that carries the real tokenizer."""

import dataclasses
import os
import pty
import select
import subprocess
import sys
import time

import pytest

from qwen2.checkpoint import Pretrained, save_pretrained
from qwen2.config import PRESETS
from qwen2.model import Qwen2ForCausalLM


def qwen2_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "qwen2", *args]


@pytest.mark.parametrize("extra", [[], ["--quantize", "int8", "--kv-cache-dtype", "int8"]])
def test_one_shot_chat_from_stdin(demo_path, extra):
    result = subprocess.run(qwen2_cmd("chat", "--model", str(demo_path), "--max-new-tokens", "20", *extra),
                            input="What is 2 + 3? Reply with only the number.", capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "5" in result.stdout
    assert "tokens/s" in result.stderr and "finish_reason=stop" in result.stderr


def test_interactive_chat_keeps_history(demo_path):
    """Drive `qwen2 chat` through a pseudo-terminal, as a person at a keyboard would."""
    pid, fd = pty.fork()
    if pid == 0:  # child: stdin/stdout are the terminal
        os.execv(sys.executable, qwen2_cmd("chat", "--model", str(demo_path), "--max-new-tokens", "30"))
    transcript = b""

    def read_until(marker: bytes, timeout: float, start: int = 0) -> None:
        nonlocal transcript
        deadline = time.monotonic() + timeout
        while marker not in transcript[start:]:
            assert time.monotonic() < deadline, transcript.decode(errors="replace")
            if select.select([fd], [], [], 1.0)[0]:
                try:
                    transcript += os.read(fd, 4096)
                except OSError:
                    break

    try:
        read_until(b">>> ", 300)
        os.write(fd, b"My name is Ada. Remember it.\n")
        read_until(b"tokens/s", 300)
        start = transcript.index(b"tokens/s")
        read_until(b">>> ", 60, start)
        start = len(transcript)
        os.write(fd, b"What is my name? Answer in one word.\n")
        read_until(b"tokens/s", 300, start)
        assert b"Ada" in transcript[start:], transcript.decode(errors="replace")
        os.write(fd, b"/exit\n")
        _, status = os.waitpid(pid, 0)
        assert os.WEXITSTATUS(status) == 0
    finally:
        try:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
        except (ProcessLookupError, ChildProcessError):
            pass
        os.close(fd)


@pytest.fixture(scope="module")
def small_dir(demo, tmp_path_factory):
    """A random model with the real vocabulary and tokenizer, and a 32-token context."""
    config = dataclasses.replace(PRESETS["tiny"], vocab_size=demo.model.config.vocab_size, max_position_embeddings=32,
                                 eos_token_id=151645, bos_token_id=151643)
    model = Qwen2ForCausalLM(config)
    model.init_weights(seed=0)
    path = tmp_path_factory.mktemp("small")
    save_pretrained(Pretrained(model, demo.tokenizer, {}, "small"), path)
    return path


def test_generate_raw_on_a_model_directory(small_dir):
    result = subprocess.run(qwen2_cmd("generate", "--model", str(small_dir), "--raw", "--max-new-tokens", "5",
                                      "def fib(n):"), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "5 new tokens" in result.stderr and "finish_reason=length" in result.stderr


def test_prompt_longer_than_the_context_is_a_clear_error(small_dir):
    result = subprocess.run(qwen2_cmd("generate", "--model", str(small_dir), "word " * 100),
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("qwen2 generate: error: the prompt has") and "context is 32 tokens" in last
    assert "Traceback" not in result.stderr
