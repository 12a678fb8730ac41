"""Hugging Face checkpoint directories: config.json + model*.safetensors (single or sharded).

Loading is strict: every parameter the model needs must be present with the expected shape, and
every tensor in the files must be one the model knows. Errors name the file and the tensor.
Pickle checkpoints (`pytorch_model.bin`) are refused: loading them can run arbitrary code.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Callable, Iterator

import torch
from torch import nn
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from qwen2.atomic import atomic_path, atomic_write_text
from qwen2.config import Qwen2Config
from qwen2.model import Qwen2ForCausalLM
from qwen2.model.reward import Qwen2RewardModel, is_reward_config
from qwen2.model.quant import (QuantConfig, fuse_projections_, quantize_embedding, quantize_embedding_,
                               quantize_linear, quantize_weight, quantized_linear)

# Tensors some exporters write that are derived, not learned; skipping them is safe.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)
_MAX_INDEX_BYTES = 64 << 20


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded; the message names the file and, where known, the tensor."""


def build_empty_model(config: Qwen2Config) -> Qwen2ForCausalLM | Qwen2RewardModel:
    """A model whose parameters live on the meta device (no memory) until weights are assigned:
    the causal LM, or the reward model when config.json names Qwen2ForSequenceClassification."""
    with torch.device("meta"):
        return Qwen2RewardModel(config) if is_reward_config(config) else Qwen2ForCausalLM(config)


def _portable_shapes(out_features: int, in_features: int,
                     quant: QuantConfig) -> dict[str, tuple[tuple[int, ...], torch.dtype | None]]:
    """Shape and dtype (None = any float) of each portable tensor of a quantized (out, in) layer."""
    if quant.mode == "int8":
        return {"qweight": ((out_features, in_features), torch.int8), "scales": ((out_features,), None)}
    groups = (out_features, in_features // quant.group_size)
    return {"qweight": ((out_features, in_features // 2), torch.uint8), "scales": (groups, None), "zeros": (groups, None)}


def assign_weights(model: Qwen2ForCausalLM, tensors: Iterator[tuple[str, torch.Tensor, str]], *,
                   dtype: torch.dtype, device: torch.device | str, quant: QuantConfig | None = None,
                   prequantized: bool = False,
                   exact_int4: Callable[[str, int], dict[str, torch.Tensor] | None] | None = None
                   ) -> Qwen2ForCausalLM:
    """Move (name, tensor, source file) triples into a meta-device model, checking names and shapes.

    With `quant`, each linear weight it applies to is quantized the moment it arrives, so the
    float copy of only one tensor exists at a time. `prequantized` checkpoints store those layers as
    portable quantized tensors (`<layer>.qweight`, `.scales`, `.zeros`) instead of `<layer>.weight`;
    the layers in `quant.int8_modules` are int8 ones. `exact_int4(weight name, group size)` may
    give the portable int4 tensors of a weight the source already stores on an int4 grid (a GGUF's
    4-bit blocks): those layers take them instead of being rounded again.
    """
    if quant is not None and quant.method == "gptq" and not prequantized:
        raise ValueError("GPTQ needs the whole float model and calibration text: use load_pretrained or "
                         "save_pretrained with the GPTQ config, not quantize-while-loading")
    expected = {name: p.shape for name, p in model.state_dict().items()}
    tied = model.config.tie_word_embeddings
    targets = {name for name, m in model.named_modules() if isinstance(m, nn.Linear) and quant.applies_to(name)} \
        if quant else set()
    loaded: dict[str, torch.Tensor] = {}
    quantized: dict[str, dict[str, torch.Tensor]] = {}  # portable tensors of layers not complete yet
    built: dict[str, nn.Module] = {}  # runtime layers (bias attached at the end)
    embedding: nn.Module | None = None  # an untied model's embedding as int8 rows (with quant)

    def build(module: str) -> None:
        # The runtime layer is built as soon as a layer's tensors are complete, and the portable
        # copy dropped: holding both for every layer until the end doubled the quantized model.
        built[module] = quantized_linear(quantized.pop(module), None, quant.for_module(module), dtype)

    for name, tensor, source in tensors:
        if name.endswith(_IGNORED_SUFFIXES) or (tied and name == "lm_head.weight" and not prequantized):
            continue  # a tied checkpoint may also store the head; the embedding is the one we keep
        module, _, kind = name.rpartition(".")
        if prequantized and module in targets and kind in ("qweight", "scales", "zeros"):
            out_features, in_features = expected[f"{module}.weight"]
            shapes = _portable_shapes(out_features, in_features, quant.for_module(module))
            want_shape, want_dtype = shapes.get(kind, (None, None))
            if want_shape is None or tuple(tensor.shape) != want_shape or (want_dtype and tensor.dtype != want_dtype):
                raise CheckpointError(f"{source}: quantized tensor {name!r} has shape {tuple(tensor.shape)} "
                                      f"and dtype {tensor.dtype}; expected {want_shape} {want_dtype or 'float'}")
            quantized.setdefault(module, {})[kind] = tensor
            if set(quantized[module]) == set(shapes):
                build(module)
            continue
        if name not in expected:
            raise CheckpointError(f"{source}: unexpected tensor {name!r} (not a Qwen2 parameter for this config)")
        if tuple(tensor.shape) != tuple(expected[name]):
            raise CheckpointError(f"{source}: tensor {name!r} has shape {tuple(tensor.shape)}, "
                                  f"expected {tuple(expected[name])} from config.json")
        if not tensor.is_floating_point():
            raise CheckpointError(f"{source}: tensor {name!r} has dtype {tensor.dtype}; expected floating point")
        if module in targets and kind == "weight" and not prequantized:
            layer_quant = quant.for_module(module)
            exact = exact_int4(name, layer_quant.group_size) if exact_int4 and layer_quant.mode == "int4" else None
            built[module] = quantized_linear(exact, None, layer_quant, dtype) if exact is not None else \
                quantize_linear(tensor, layer_quant, dtype)  # the float copy is dropped here
            continue
        if quant is not None and not tied and name == "model.embed_tokens.weight":
            # int8 rows the moment it arrives: the float embedding is the largest tensor
            embedding = quantize_embedding(tensor, dtype).to(device)
            continue
        loaded[name] = tensor.to(device=device, dtype=dtype)
    if quant:
        for module, pieces in quantized.items():
            needed = set(_portable_shapes(1, quant.group_size * 2, quant.for_module(module)))
            if set(pieces) != needed:
                raise CheckpointError(f"checkpoint: quantized layer {module!r} lacks {sorted(needed - set(pieces))}")
    # A tied head is never read from the file: it is the embedding (or quantized from it below).
    required = set(expected) - ({"lm_head.weight"} if tied else set())
    missing = sorted(required - set(loaded) - {f"{m}.weight" for m in built}
                     - ({"model.embed_tokens.weight"} if embedding is not None else set()))
    if missing:
        shown = ", ".join(repr(m) for m in missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise CheckpointError(f"checkpoint is missing {len(missing)} tensor(s): {shown}")
    model.load_state_dict(loaded, strict=False, assign=True)
    model.tie_weights()
    if quant:
        if tied and "lm_head" in targets and "lm_head" not in built:
            built["lm_head"] = quantize_linear(model.model.embed_tokens.weight, quant.for_module("lm_head"), dtype)
        for module, layer in built.items():
            bias = model.get_submodule(module).bias
            if bias is not None:
                layer.bias = nn.Parameter(bias.detach().to(dtype), requires_grad=False)
            model.set_submodule(module, layer.to(device))
        built.clear()  # the model holds the layers now; merging below must be able to free the separate ones
        if embedding is not None:
            model.model.embed_tokens = embedding
        quantize_embedding_(model)  # tied: the embedding reads the quantized head's rows
        fuse_projections_(model)
    return model.eval()


def _weight_files(directory: Path) -> list[Path]:
    """The safetensors files of a directory: model.safetensors, else the shards named by the index."""
    single = directory / "model.safetensors"
    if single.is_file():
        return [single]
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        if index.stat().st_size > _MAX_INDEX_BYTES:
            raise CheckpointError(f"{index}: index file is implausibly large")
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            files = sorted(set(weight_map.values()))
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{index}: not a valid safetensors index ({type(e).__name__}: {e})") from None
        paths = []
        for name in files:
            if not isinstance(name, str):
                raise CheckpointError(f"{index}: shard name {name!r} is not a string")
            path = (directory / name).resolve()
            if path.parent != directory.resolve():
                raise CheckpointError(f"{index}: shard {name!r} is not a file inside {directory}")
            if not path.is_file():
                raise CheckpointError(f"{index}: shard {name} is missing from {directory}")
            paths.append(path)
        return paths
    if any((directory / n).exists() for n in ("pytorch_model.bin", "pytorch_model.bin.index.json")):
        raise CheckpointError(f"{directory}: only pickle weights (pytorch_model.bin) found; they are not loaded "
                              "because unpickling can run code. Convert them to safetensors first.")
    raise CheckpointError(f"{directory}: no model.safetensors or model.safetensors.index.json")


def _iter_safetensors(files: list[Path]) -> Iterator[tuple[str, torch.Tensor, str]]:
    for path in files:
        try:
            with safe_open(str(path), framework="pt") as f:
                for name in f.keys():
                    yield name, f.get_tensor(name), str(path)
        except SafetensorError as e:
            raise CheckpointError(f"{path}: corrupt or truncated safetensors file ({e})") from None
        except OSError as e:
            raise CheckpointError(f"{path}: cannot read ({e})") from None


def load_hf_model(directory: str | Path, *, dtype: torch.dtype | None = None, device: torch.device | str = "cpu",
                  quant: QuantConfig | None = None) -> Qwen2ForCausalLM:
    """Load config.json and the safetensors weights of a Hugging Face model directory.

    dtype None keeps the checkpoint's `torch_dtype` (bfloat16 for the official models). `quant`
    quantizes the linear layers while loading; a checkpoint saved quantized by qwen2 (its
    config.json has our `quantization_config`) loads quantized as it was saved.
    """
    directory = Path(directory)
    config = Qwen2Config.from_json_file(directory / "config.json")
    if dtype is None:
        dtype = getattr(torch, config.torch_dtype) if config.torch_dtype not in (None, "auto") else torch.float32
    stored = config.extra.get("quantization_config")
    if stored is not None:
        try:
            saved_quant = QuantConfig.from_dict(stored)
        except (ValueError, TypeError) as e:
            raise CheckpointError(f"{directory / 'config.json'}: unsupported quantization_config "
                                  f"(only qwen2's own int8/int4 checkpoints load here): {e}") from None
        # How the integers were chosen (method) does not matter once they are stored; the layout does.
        if quant is not None and dataclasses.replace(quant, method=saved_quant.method) != saved_quant:
            raise CheckpointError(f"{directory}: saved as {saved_quant.describe()}; "
                                  f"cannot re-quantize it as {quant.describe()}")
        quant = saved_quant
    if quant is not None and is_reward_config(config):
        raise CheckpointError(f"{directory}: a reward model (Qwen2ForSequenceClassification) loads in float only")
    files = _weight_files(directory)
    return assign_weights(build_empty_model(config), _iter_safetensors(files), dtype=dtype, device=device,
                          quant=quant, prequantized=stored is not None)


def save_hf_model(model: Qwen2ForCausalLM, directory: str | Path, *, dtype: torch.dtype | None = None,
                  max_shard_bytes: int = 4 << 30, quant: QuantConfig | None = None,
                  quantized: dict[str, dict[str, torch.Tensor]] | None = None) -> None:
    """Write config.json and model.safetensors (sharded with an index above max_shard_bytes).

    With `quant`, the layers it applies to are stored as portable quantized tensors: those given in
    `quantized` (module path -> tensors; every such layer for GPTQ, qwen2.model.gptq), the others
    rounded to nearest here. Files are written to temporary names and renamed, so an interrupted
    save never leaves a half-written file under the final name.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    dtype = dtype or model.dtype
    if not isinstance(getattr(model, "lm_head", None) or getattr(model, "score"), nn.Linear) or any(
            not isinstance(m, nn.Linear) for m in model.model.layers[0].mlp.children()):
        raise ValueError("save the float model and pass quant=...: runtime int4 weights are in a private layout")
    state = {k: v.detach().to(dtype).contiguous() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)  # transformers re-ties it from the embedding
    if quant is not None:  # portable quantized tensors replace the float weights of the target layers
        if quant.method == "gptq" and quantized is None:
            raise ValueError("quant.method is 'gptq' but no GPTQ tensors were given (see qwen2.model.gptq)")
        for name, module in model.named_modules():
            if isinstance(module, nn.Linear) and quant.applies_to(name):
                state.pop(f"{name}.weight", None)
                if quant.method == "gptq" and name not in quantized:
                    raise ValueError(f"no quantized tensors given for layer {name!r}")
                pieces = (quantized or {}).get(name) or quantize_weight(module.weight, quant.for_module(name))
                # scales and zeros stay float32: they are small, and rounding them would add error
                state.update({f"{name}.{kind}": t for kind, t in pieces.items()})
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, tensor in state.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensor
        size += nbytes
    metadata = {"format": "pt"}
    # Remove weights of an earlier save first: a stale index or shard would otherwise be loaded
    # (or mixed in) instead of what we write now.
    for stale in [directory / "model.safetensors", directory / "model.safetensors.index.json",
                  *directory.glob("model-*-of-*.safetensors")]:
        stale.unlink(missing_ok=True)
    if len(shards) == 1:
        _atomic_save(shards[0], directory / "model.safetensors", metadata)
    else:
        weight_map = {}
        for i, shard in enumerate(shards, 1):
            fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
            _atomic_save(shard, directory / fname, metadata)
            weight_map.update({name: fname for name in shard})
        total = sum(t.numel() * t.element_size() for t in state.values())
        atomic_write_text(directory / "model.safetensors.index.json",
                           json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    config = Qwen2Config.from_dict(model.config.to_dict())
    config.torch_dtype = str(dtype).removeprefix("torch.")
    config.extra.pop("quantization_config", None)
    if quant is not None:
        config.extra["quantization_config"] = quant.to_dict()
    config.save(directory / "config.json")


def _atomic_save(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
