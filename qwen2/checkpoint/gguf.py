"""GGUF import: config, tokenizer and weights of a llama.cpp `qwen2` file, dequantized to float.

The only module that imports `gguf`. GGUF stores llama.cpp's tensor names; this file holds the one
table that maps them to the Hugging Face names the model uses. A GGUF file is untrusted input: any
failure to parse it becomes a CheckpointError naming the file.
"""

from __future__ import annotations

import math
import mmap
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from qwen2.checkpoint.gguf_int4 import GROUP, decode_int4_blocks, is_int4_grid
from qwen2.checkpoint.safetensors import CheckpointError, assign_weights, build_empty_model
from qwen2.config import ConfigError, Qwen2Config
from qwen2.model import Qwen2ForCausalLM
from qwen2.model.quant import QuantConfig
from qwen2.sysmem import return_freed_memory

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


_MAGIC = b"GGUF"
# GGUF metadata value types -> (struct format, size); 8 = string and 9 = array are handled apart.
_SCALARS = {0: ("<B", 1), 1: ("<b", 1), 2: ("<H", 2), 3: ("<h", 2), 4: ("<I", 4), 5: ("<i", 4), 6: ("<f", 4),
            7: ("<?", 1), 10: ("<Q", 8), 11: ("<q", 8), 12: ("<d", 8)}
_STRING, _ARRAY = 8, 9
_MAX_DIMS = 4
LARGE_TENSOR = 1 << 24  # elements; larger tensors are dequantized in blocks of rows
ROWS_CHUNK_ELEMENTS = 1 << 22  # about 16 MB of float32 per block


@dataclass
class TensorInfo:
    name: str
    shape: tuple[int, ...]  # PyTorch order (outermost first); GGUF stores it innermost first
    qtype: int
    offset: int  # absolute byte offset in the file
    nbytes: int


class _Cursor:
    """Bounds-checked little-endian reads from a byte buffer; any overrun is a CheckpointError."""

    def __init__(self, buf: memoryview, path: Path) -> None:
        self.buf, self.pos, self.path = buf, 0, path

    def need(self, n: int, what: str) -> None:
        if n < 0 or self.pos + n > len(self.buf):
            raise CheckpointError(f"{self.path}: file ends inside {what} (offset {self.pos}, {n} bytes needed)")

    def scalar(self, fmt: str, size: int, what: str) -> Any:
        self.need(size, what)
        value = struct.unpack_from(fmt, self.buf, self.pos)[0]
        self.pos += size
        return value

    def string(self, what: str) -> str:
        n = self.scalar("<Q", 8, what)
        self.need(n, what)
        raw = bytes(self.buf[self.pos:self.pos + n])
        self.pos += n
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise CheckpointError(f"{self.path}: {what} is not valid UTF-8") from None

    def value(self, vtype: int, what: str) -> Any:
        if vtype in _SCALARS:
            return self.scalar(*_SCALARS[vtype], what)
        if vtype == _STRING:
            return self.string(what)
        if vtype == _ARRAY:
            etype = self.scalar("<I", 4, what)
            count = self.scalar("<Q", 8, what)
            min_size = _SCALARS[etype][1] if etype in _SCALARS else 8  # strings take >= 8 bytes each
            if etype == _ARRAY:
                raise CheckpointError(f"{self.path}: {what} is a nested array (not used by any Qwen2 file)")
            self.need(count * min_size, what)  # a hostile count cannot make us loop or allocate past the file
            if etype in _SCALARS:
                fmt, size = _SCALARS[etype]
                values = list(struct.unpack_from(f"<{count}{fmt[1]}", self.buf, self.pos))
                self.pos += count * size
                return values
            return [self.value(etype, what) for _ in range(count)]
        raise CheckpointError(f"{self.path}: {what} has unknown value type {vtype}")


class GGUFFile:
    """A parsed GGUF file: metadata as Python values, tensor descriptions, memory-mapped data.

    We parse the header ourselves (gguf's reader builds a numpy view per string and takes ~10 s
    on a 151k-token vocabulary; this takes well under a second) and use the `gguf` package for
    what it is good at: the quantization constants and dequantization kernels. Every count and
    offset is checked against the file size before it is used, so a hostile file costs bounded
    time and memory.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise CheckpointError(f"{self.path}: GGUF file not found")
        with open(self.path, "rb") as f:
            try:
                self._mmap = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
            except ValueError:  # empty file
                raise CheckpointError(f"{self.path}: not a valid GGUF file (empty)") from None
        cursor = _Cursor(memoryview(self._mmap), self.path)
        cursor.need(4, "the magic number")
        if bytes(cursor.buf[:4]) != _MAGIC:
            raise CheckpointError(f"{self.path}: not a valid GGUF file (magic {bytes(cursor.buf[:4])!r})")
        cursor.pos = 4
        version = cursor.scalar("<I", 4, "the version")
        if version not in (2, 3):
            raise CheckpointError(f"{self.path}: GGUF version {version} is not supported (2 or 3)")
        num_tensors = cursor.scalar("<Q", 8, "the tensor count")
        num_fields = cursor.scalar("<Q", 8, "the metadata count")
        self.fields: dict[str, Any] = {}
        for i in range(num_fields):
            cursor.need(8, "metadata")  # each entry takes at least a key length
            key = cursor.string(f"metadata key #{i}")
            vtype = cursor.scalar("<I", 4, f"metadata {key!r}")
            self.fields[key] = cursor.value(vtype, f"metadata {key!r}")
        raw_infos = []
        for i in range(num_tensors):
            cursor.need(8, "tensor descriptions")
            name = cursor.string(f"tensor name #{i}")
            n_dims = cursor.scalar("<I", 4, f"tensor {name!r}")
            if not 1 <= n_dims <= _MAX_DIMS:
                raise CheckpointError(f"{self.path}: tensor {name!r} has {n_dims} dimensions")
            dims = [cursor.scalar("<Q", 8, f"tensor {name!r}") for _ in range(n_dims)]
            qtype = cursor.scalar("<I", 4, f"tensor {name!r}")
            offset = cursor.scalar("<Q", 8, f"tensor {name!r}")
            raw_infos.append((name, dims, qtype, offset))
        alignment = self.fields.get("general.alignment", 32)
        if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
            raise CheckpointError(f"{self.path}: general.alignment {alignment!r} is not a power of two")
        data_start = -(-cursor.pos // alignment) * alignment
        self.tensors = [self._tensor_info(data_start, *info) for info in raw_infos]
        self._hf_names = {hf_name(t.name): t for t in self.tensors}
        arch = self.fields.get("general.architecture")
        if arch != "qwen2":
            raise CheckpointError(f"{self.path}: GGUF architecture is {arch!r}, expected 'qwen2'")

    def _tensor_info(self, data_start: int, name: str, dims: list[int], qtype: int, offset: int) -> TensorInfo:
        from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

        try:
            block_size, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(qtype)]
        except (ValueError, KeyError):
            raise CheckpointError(f"{self.path}: tensor {name!r} has unknown type {qtype}") from None
        if any(d <= 0 or d > 1 << 40 for d in dims) or dims[0] % block_size:
            raise CheckpointError(f"{self.path}: tensor {name!r} has invalid shape {dims}")
        nbytes = math.prod(dims) // block_size * type_size
        start = data_start + offset
        if start + nbytes > len(self._mmap):
            raise CheckpointError(f"{self.path}: tensor {name!r} lies beyond the end of the file (truncated?)")
        return TensorInfo(name, tuple(reversed(dims)), qtype, start, nbytes)

    def get(self, key: str, default: Any = None) -> Any:
        return self.fields.get(key, default)

    def require(self, key: str) -> Any:
        value = self.get(key)
        if value is None:
            raise CheckpointError(f"{self.path}: metadata {key!r} is missing")
        return value

    def number(self, key: str, default: Any = None, *, kind: type = int) -> Any:
        """A numeric metadata value converted to `kind`; a wrong type is a CheckpointError naming the key."""
        value = self.require(key) if default is None else self.get(key, default)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise CheckpointError(f"{self.path}: metadata {key!r} must be a number, got {value!r}")
        return kind(value)

    def config(self) -> Qwen2Config:
        tensors = {t.name: t for t in self.tensors}
        if "token_embd.weight" not in tensors:
            raise CheckpointError(f"{self.path}: tensor 'token_embd.weight' is missing")
        hidden = self.number("qwen2.embedding_length")
        heads = self.number("qwen2.attention.head_count")
        if heads <= 0:
            raise CheckpointError(f"{self.path}: metadata 'qwen2.attention.head_count' must be positive")
        key_length = self.get("qwen2.attention.key_length")
        data: dict[str, Any] = {
            "vocab_size": int(tensors["token_embd.weight"].shape[0]),
            "hidden_size": hidden,
            "intermediate_size": self.number("qwen2.feed_forward_length"),
            "num_hidden_layers": self.number("qwen2.block_count"),
            "num_attention_heads": heads,
            "num_key_value_heads": self.number("qwen2.attention.head_count_kv", heads),
            "max_position_embeddings": self.number("qwen2.context_length", 32768),
            "rms_norm_eps": self.number("qwen2.attention.layer_norm_rms_epsilon", 1e-6, kind=float),
            "rope_theta": self.number("qwen2.rope.freq_base", 1_000_000.0, kind=float),
            # A separate output tensor means an untied head (llama.cpp and transformers agree).
            "tie_word_embeddings": "output.weight" not in tensors,
            "bos_token_id": self.get("tokenizer.ggml.bos_token_id"),
            "eos_token_id": self.get("tokenizer.ggml.eos_token_id"),
            "torch_dtype": "float32",
        }
        if key_length is not None and self.number("qwen2.attention.key_length") != hidden // heads:
            data["head_dim"] = self.number("qwen2.attention.key_length")
        scaling_type = self.get("qwen2.rope.scaling.type")
        if scaling_type in ("yarn", "linear"):
            data["rope_scaling"] = {"rope_type": scaling_type,
                                    "factor": self.number("qwen2.rope.scaling.factor", kind=float)}
            if self.get("qwen2.rope.scaling.original_context_length"):
                data["rope_scaling"]["original_max_position_embeddings"] = self.number(
                    "qwen2.rope.scaling.original_context_length")
        try:
            return Qwen2Config.from_dict(data, source=str(self.path))
        except ConfigError as e:
            raise CheckpointError(str(e)) from None

    def tokenizer_fields(self) -> dict[str, Any]:
        """The tokenizer metadata as plain Python values (for qwen2.tokenizer.tokenizer_json_from_gguf)."""
        model = self.get("tokenizer.ggml.model")
        if model != "gpt2":
            raise CheckpointError(f"{self.path}: tokenizer model is {model!r}, expected 'gpt2' (byte-level BPE)")
        fields = {key: self.require(f"tokenizer.ggml.{key}") for key in ("tokens", "token_type", "merges")}
        for key, value in fields.items():
            element = int if key == "token_type" else str
            if not isinstance(value, list) or not all(type(v) is element for v in value):
                raise CheckpointError(f"{self.path}: metadata 'tokenizer.ggml.{key}' must be a list of {element.__name__}")
        return {
            "tokens": fields["tokens"],
            "token_types": fields["token_type"],
            "merges": fields["merges"],
            "bos_id": self.get("tokenizer.ggml.bos_token_id"),
            "eos_id": self.get("tokenizer.ggml.eos_token_id"),
            "pad_id": self.get("tokenizer.ggml.padding_token_id"),
            "chat_template": self.get("tokenizer.chat_template"),
        }

    def iter_dequantized(self, *, skip: frozenset[str] = frozenset(), large_dtype: torch.dtype = torch.float32,
                         float32: frozenset[str] = frozenset(),
                         lazy: frozenset[str] = frozenset()) -> Iterator[tuple[str, torch.Tensor, str]]:
        """(HF name, float tensor, source) for every tensor except the HF names in `skip`.

        Tensors of more than LARGE_TENSOR elements (the 151,936-row embedding and head) are
        dequantized a block of rows at a time straight into `large_dtype`, so neither a float32
        copy of the whole matrix nor the dequantizer's temporaries for all of it ever exist (they
        were 1.5 GB for the demo model's embedding); the others come as float32. Large tensors named
        in `float32` (layers quantized as they load) come as LazyRows: float32 blocks of rows on demand;
        those in `lazy` as LazyRows in `large_dtype` (the same values as the whole matrix, a block at a time).
        """
        for t in self.tensors:
            name = hf_name(t.name)
            if name is None:
                raise CheckpointError(f"{self.path}: unexpected tensor {t.name!r} (not a Qwen2 tensor)")
            if name in skip:
                continue
            if math.prod(t.shape) > LARGE_TENSOR:
                if name in float32 or name in lazy:
                    tensor = LazyRows(self, t, torch.float32 if name in float32 else large_dtype)
                else:
                    tensor = self._dequantize_rows(t, large_dtype)
            else:
                tensor = torch.from_numpy(self._dequantize(t, 0, math.prod(t.shape[:-1]))).view(t.shape)
            yield name, tensor, f"{self.path} ({t.name})"
            self._release(t)
            # The consumer has dropped this tensor's float temporaries (dequantizer output, rows
            # being quantized): give the heap's freed part back now rather than at the end of the
            # load, where it had piled up to ~200 MB above what the model keeps.
            return_freed_memory()

    def int4_tensors(self, name: str, group_size: int) -> dict[str, torch.Tensor] | None:
        """Portable int4 tensors (group 32) of the linear weight with HF name `name`, read without
        rounding if the file stores it in 4-bit blocks (Q4_0 / Q4_1 / Q4_K; see gguf_int4); else None."""
        t = self._hf_names.get(name)
        if t is None or group_size != GROUP or not is_int4_grid(t.qtype) or len(t.shape) != 2:
            return None
        rows, cols = t.shape
        raw = np.frombuffer(self._mmap, dtype=np.uint8, count=t.nbytes, offset=t.offset)
        return decode_int4_blocks(raw.reshape(rows, t.nbytes // rows), t.qtype, cols)

    def _dequantize(self, t: TensorInfo, row_start: int, row_end: int) -> np.ndarray:
        """float32 rows [row_start, row_end) of tensor t (viewed as rows x last dim), writable."""
        from gguf.constants import GGMLQuantizationType
        from gguf.quants import dequantize

        qtype = GGMLQuantizationType(t.qtype)
        row_bytes = t.nbytes // math.prod(t.shape[:-1])
        raw = np.frombuffer(self._mmap, dtype=np.uint8, count=(row_end - row_start) * row_bytes,
                            offset=t.offset + row_start * row_bytes)
        try:
            array = dequantize(raw.reshape(row_end - row_start, row_bytes), qtype)
        except NotImplementedError:
            raise CheckpointError(f"{self.path}: tensor {t.name!r} uses unsupported type {qtype.name}") from None
        if not array.flags.writeable or array.dtype != np.float32:
            array = array.astype(np.float32)  # float tensors come back as read-only views of the mapping
        return array

    def _dequantize_rows(self, t: TensorInfo, dtype: torch.dtype) -> torch.Tensor:
        rows, cols = math.prod(t.shape[:-1]), t.shape[-1]
        out = torch.empty((rows, cols), dtype=dtype)
        step = max(1, ROWS_CHUNK_ELEMENTS // cols)
        for start in range(0, rows, step):
            end = min(rows, start + step)
            out[start:end] = torch.from_numpy(self._dequantize(t, start, end)).view(end - start, cols)
        return out.view(t.shape)

    def _release(self, t: TensorInfo) -> None:
        """Drop the file pages of a tensor we are done with from our resident memory (they are
        re-read on demand): otherwise the whole 0.5 GB file stays counted in RSS while loading."""
        if hasattr(mmap, "MADV_DONTNEED"):
            start = t.offset - t.offset % mmap.PAGESIZE
            self._mmap.madvise(mmap.MADV_DONTNEED, start, t.offset + t.nbytes - start)


class LazyRows:
    """A large GGUF matrix that dequantizes to float32 only the block of rows it is sliced for.

    For a layer that is quantized while loading (qwen2.model.quant.quantize_linear works a block of
    rows at a time): it rounds float32 values, exactly as quantizing the float32 model does, while
    no float32 copy of the whole matrix (545 MB for the demo model's head) ever exists.
    """

    def __init__(self, gguf_file: GGUFFile, tensor: TensorInfo, dtype: torch.dtype = torch.float32) -> None:
        self._file, self._tensor = gguf_file, tensor
        self.shape = torch.Size(tensor.shape)
        self.dtype = dtype

    def is_floating_point(self) -> bool:
        return True

    def __getitem__(self, index: slice) -> torch.Tensor:
        start, stop, step = index.indices(self.shape[0])
        if step != 1 or len(self.shape) != 2:
            raise IndexError("LazyRows supports contiguous row slices of a matrix only")
        rows = torch.from_numpy(self._file._dequantize(self._tensor, start, stop)).view(stop - start, self.shape[1])
        return rows.to(self.dtype)


def load_gguf_model(source: str | Path | GGUFFile, *, dtype: torch.dtype = torch.float32,
                    device: torch.device | str = "cpu", quant: QuantConfig | None = None) -> Qwen2ForCausalLM:
    """Build a Qwen2ForCausalLM from a GGUF file, every tensor dequantized to float32 then cast to
    dtype, or (with `quant`) requantized to our int8/int4 one tensor at a time (tensors the file
    stores in 4-bit blocks are taken into int4 layers as they are: GGUFFile.int4_tensors)."""
    gguf_file = source if isinstance(source, GGUFFile) else GGUFFile(source)
    config = gguf_file.config()
    model = build_empty_model(config)
    # A tied model's head is its embedding: a stored output.weight is never read (nor dequantized).
    skip = frozenset({"lm_head.weight"}) if config.tie_word_embeddings else frozenset()
    # A head that will be quantized arrives in float32, so it is rounded exactly as `qwen2 quantize`
    # (which starts from the float32 model) rounds it; it is the first tensor of the file, so the
    # float32 copy exists while little else is loaded.
    float32 = frozenset({"lm_head.weight"}) if quant is not None and quant.applies_to("lm_head") else frozenset()
    # An untied embedding becomes int8 rows as it loads: read a block of rows at a time too, never as
    # a whole bf16 matrix (272 MB for the demo model, which was the load's peak). In `dtype`, so the
    # rows are rounded exactly as when a saved checkpoint's embedding is loaded and quantized.
    lazy = frozenset({"model.embed_tokens.weight"}) if quant is not None and not config.tie_word_embeddings \
        else frozenset()
    tensors = gguf_file.iter_dequantized(skip=skip, large_dtype=dtype, float32=float32, lazy=lazy)
    return assign_weights(model, tensors, dtype=dtype, device=device, quant=quant,
                          exact_int4=gguf_file.int4_tensors)
