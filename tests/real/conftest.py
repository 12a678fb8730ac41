"""Fixtures for tests on the real demo weights (Qwen2.5-Coder-0.5B-Instruct GGUF).

Loading is expensive (seconds, GBs), so every model here is session-scoped and built once.
"""

import pytest
import torch


def pytest_collection_modifyitems(items):
    for item in items:
        if "tests/real/" in str(item.fspath):
            item.add_marker(pytest.mark.real)


@pytest.fixture(scope="session")
def demo_path():
    from qwen2.demo import demo_gguf_path

    return demo_gguf_path()


@pytest.fixture(scope="session")
def demo(demo_path):
    from qwen2.checkpoint import load_pretrained

    return load_pretrained(demo_path, dtype=torch.float32)


@pytest.fixture(scope="session")
def hf_demo(demo_path):
    """transformers' own GGUF loader (dequantizes to fp32): the reference implementation."""
    transformers = pytest.importorskip("transformers")
    return transformers.AutoModelForCausalLM.from_pretrained(
        demo_path.parent, gguf_file=demo_path.name, dtype=torch.float32).eval()
