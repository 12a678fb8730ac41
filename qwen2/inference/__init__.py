"""Inference: sampling (pure functions) and the reference generator."""

from qwen2.inference.generate import ContextLengthError, TextStream, generate_ids, generate_text
from qwen2.inference.sampling import SamplingParams, sample_next_token

__all__ = ["ContextLengthError", "SamplingParams", "TextStream", "generate_ids", "generate_text", "sample_next_token"]
