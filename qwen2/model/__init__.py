"""The Qwen2 network: one attention, one RoPE, one MLP; features are configuration."""

from qwen2.model.kv_cache import KVCache
from qwen2.model.transformer import Qwen2ForCausalLM, Qwen2Model, RMSNorm

__all__ = ["KVCache", "Qwen2ForCausalLM", "Qwen2Model", "RMSNorm"]
