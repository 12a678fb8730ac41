"""qwen2: the Qwen2 system in PyTorch.

Public API (imported lazily so that `qwen2 --help` does not pay for torch):
Qwen2Config, PRESETS, Qwen2ForCausalLM, KVCache, Tokenizer, load_pretrained, save_pretrained,
SamplingParams, generate_text, generate_ids.
"""

from importlib import import_module
from typing import Any

_EXPORTS = {
    "Qwen2Config": "qwen2.config", "PRESETS": "qwen2.config",
    "Qwen2ForCausalLM": "qwen2.model", "KVCache": "qwen2.model",
    "Tokenizer": "qwen2.tokenizer",
    "load_pretrained": "qwen2.checkpoint", "save_pretrained": "qwen2.checkpoint",
    "SamplingParams": "qwen2.inference", "generate_text": "qwen2.inference", "generate_ids": "qwen2.inference",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'qwen2' has no attribute {name!r}")
