"""GGUF import: config, tokenizer and weights of a llama.cpp `qwen2` file, dequantized to float.

The only module that imports `gguf`. GGUF stores llama.cpp's tensor names; this file holds the one
table that maps them to the Hugging Face names the model uses. A GGUF file is untrusted input: any
failure to parse it becomes a CheckpointError naming the file.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from qwen2.checkpoint.safetensors import CheckpointError, assign_weights, build_empty_model
from qwen2.config import ConfigError, Qwen2Config
from qwen2.model import Qwen2ForCausalLM

_LAYER_NAMES = {
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
}
_GLOBAL_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_LAYER_RE = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")


def hf_name(gguf_name: str) -> str | None:
    """Hugging Face parameter name for a GGUF tensor name, or None if it is not a Qwen2 tensor."""
    if m := _LAYER_RE.fullmatch(gguf_name):
        layer, part, kind = m.groups()
        return f"model.layers.{layer}.{_LAYER_NAMES[part]}.{kind}" if part in _LAYER_NAMES else None
    base, _, kind = gguf_name.rpartition(".")
    return f"{_GLOBAL_NAMES[base]}.{kind}" if base in _GLOBAL_NAMES else None


class GGUFFile:
    """An opened (memory-mapped) GGUF file with typed access to its metadata."""

    def __init__(self, path: str | Path) -> None:
        from gguf import GGUFReader

        self.path = Path(path)
        if not self.path.is_file():
            raise CheckpointError(f"{self.path}: GGUF file not found")
        try:
            self.reader = GGUFReader(str(self.path))
        except Exception as e:  # the reader raises many types on hostile input; all mean "bad file"
            raise CheckpointError(f"{self.path}: not a valid GGUF file ({type(e).__name__}: {e})") from None
        arch = self.get("general.architecture")
        if arch != "qwen2":
            raise CheckpointError(f"{self.path}: GGUF architecture is {arch!r}, expected 'qwen2'")

    def get(self, key: str, default: Any = None) -> Any:
        field = self.reader.fields.get(key)
        if field is None:
            return default
        try:
            return field.contents()
        except Exception as e:
            raise CheckpointError(f"{self.path}: metadata {key!r} is malformed ({e})") from None

    def require(self, key: str) -> Any:
        value = self.get(key)
        if value is None:
            raise CheckpointError(f"{self.path}: metadata {key!r} is missing")
        return value

    def config(self) -> Qwen2Config:
        tensors = {t.name: t for t in self.reader.tensors}
        if "token_embd.weight" not in tensors:
            raise CheckpointError(f"{self.path}: tensor 'token_embd.weight' is missing")
        hidden = int(self.require("qwen2.embedding_length"))
        heads = int(self.require("qwen2.attention.head_count"))
        key_length = self.get("qwen2.attention.key_length")
        data: dict[str, Any] = {
            "vocab_size": int(tensors["token_embd.weight"].shape[-1]),  # GGUF shapes are innermost-first
            "hidden_size": hidden,
            "intermediate_size": int(self.require("qwen2.feed_forward_length")),
            "num_hidden_layers": int(self.require("qwen2.block_count")),
            "num_attention_heads": heads,
            "num_key_value_heads": int(self.get("qwen2.attention.head_count_kv", heads)),
            "max_position_embeddings": int(self.get("qwen2.context_length", 32768)),
            "rms_norm_eps": float(self.get("qwen2.attention.layer_norm_rms_epsilon", 1e-6)),
            "rope_theta": float(self.get("qwen2.rope.freq_base", 1_000_000.0)),
            # A separate output tensor means an untied head (llama.cpp and transformers agree).
            "tie_word_embeddings": "output.weight" not in tensors,
            "bos_token_id": self.get("tokenizer.ggml.bos_token_id"),
            "eos_token_id": self.get("tokenizer.ggml.eos_token_id"),
            "torch_dtype": "float32",
        }
        if key_length is not None and int(key_length) != hidden // heads:
            data["head_dim"] = int(key_length)
        scaling_type = self.get("qwen2.rope.scaling.type")
        if scaling_type in ("yarn", "linear"):
            data["rope_scaling"] = {"rope_type": scaling_type, "factor": float(self.require("qwen2.rope.scaling.factor"))}
            original = self.get("qwen2.rope.scaling.original_context_length")
            if original:
                data["rope_scaling"]["original_max_position_embeddings"] = int(original)
        try:
            return Qwen2Config.from_dict(data, source=str(self.path))
        except ConfigError as e:
            raise CheckpointError(str(e)) from None

    def tokenizer_fields(self) -> dict[str, Any]:
        """The tokenizer metadata as plain Python values (for qwen2.tokenizer.tokenizer_json_from_gguf)."""
        model = self.get("tokenizer.ggml.model")
        if model != "gpt2":
            raise CheckpointError(f"{self.path}: tokenizer model is {model!r}, expected 'gpt2' (byte-level BPE)")
        return {
            "tokens": list(self.require("tokenizer.ggml.tokens")),
            "token_types": [int(t) for t in self.require("tokenizer.ggml.token_type")],
            "merges": list(self.require("tokenizer.ggml.merges")),
            "bos_id": self.get("tokenizer.ggml.bos_token_id"),
            "eos_id": self.get("tokenizer.ggml.eos_token_id"),
            "pad_id": self.get("tokenizer.ggml.padding_token_id"),
            "chat_template": self.get("tokenizer.chat_template"),
        }

    def iter_dequantized(self) -> Iterator[tuple[str, torch.Tensor, str]]:
        from gguf.quants import dequantize

        for t in self.reader.tensors:
            name = hf_name(t.name)
            if name is None:
                raise CheckpointError(f"{self.path}: unexpected tensor {t.name!r} (not a Qwen2 tensor)")
            try:
                array = dequantize(t.data, t.tensor_type)
            except NotImplementedError:
                raise CheckpointError(f"{self.path}: tensor {t.name!r} uses unsupported type {t.tensor_type.name}") from None
            except Exception as e:
                raise CheckpointError(f"{self.path}: tensor {t.name!r} is corrupt ({e})") from None
            array = np.ascontiguousarray(array, dtype=np.float32)
            if not array.flags.writeable:
                array = array.copy()  # float32 tensors come back as read-only views of the mmap
            yield name, torch.from_numpy(array), f"{self.path} ({t.name})"


def load_gguf_model(path: str | Path, *, dtype: torch.dtype = torch.float32,
                    device: torch.device | str = "cpu") -> Qwen2ForCausalLM:
    """Build a Qwen2ForCausalLM from a GGUF file, every tensor dequantized to float32 then cast to dtype."""
    gguf_file = GGUFFile(path)
    model = build_empty_model(gguf_file.config())
    return assign_weights(model, gguf_file.iter_dequantized(), dtype=dtype, device=device)
