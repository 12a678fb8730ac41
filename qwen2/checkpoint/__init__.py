"""Checkpoints: Hugging Face directories (safetensors), GGUF import, hub ids, the demo model."""

from qwen2.checkpoint.loader import Pretrained, load_pretrained, resolve, save_pretrained
from qwen2.checkpoint.safetensors import CheckpointError, load_hf_model, save_hf_model

__all__ = ["CheckpointError", "Pretrained", "load_hf_model", "load_pretrained", "resolve", "save_hf_model",
           "save_pretrained"]
