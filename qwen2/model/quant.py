"""Weight-only int8 / int4 quantization of the linear layers, on PyTorch's packed CPU kernels.

Two steps, as in gpt-fast: `quantize_weight` turns a float weight into *portable* tensors (what a
quantized checkpoint stores), and `Int8Linear` / `Int4Linear` are built from those tensors for
runtime (int4 is repacked into the CPU kernel's private tile layout, which is never saved).

- int8: symmetric, one scale per output channel: w ~= q * scale, q in [-127, 127].
- int4: asymmetric, one (scale, min) pair per group of `group_size` input columns:
  w ~= q * scale + min, q in [0, 15]. Portable storage packs two columns per byte (low nibble =
  even column).

How the integers are chosen is the `method`: "rtn" rounds each weight to the nearest grid point
(here, at load time, in milliseconds); "gptq" (qwen2.model.gptq) calibrates on text and lets the
rounding error of each column be absorbed by the columns not yet quantized. Both write the same
portable tensors and run on the same kernels. A mixed-precision int4 model keeps the layers named
in `int8_modules` at int8 (`QuantConfig.for_module`).

Activations stay in the model's float dtype; only weights are quantized.
"""

from __future__ import annotations

import copy
import functools
import math
import threading
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from qwen2 import kernels
from qwen2.sysmem import return_freed_memory

QuantMode = Literal["int8", "int4"]
QUANT_MODES: tuple[str, ...] = ("int8", "int4")
QuantMethod = Literal["rtn", "gptq"]
QUANT_METHODS: tuple[str, ...] = ("rtn", "gptq")
# The int4 CPU kernel takes the packed weight in tiles of 16 * inner_k_tiles rows of K.
_INNER_K_TILES = 2


@dataclass(frozen=True)
class QuantConfig:
    mode: QuantMode
    group_size: int = 32  # int4 only; must divide every in_features
    include_lm_head: bool = True
    method: QuantMethod = "rtn"  # how the integers were chosen; the stored format is the same
    # int4 only: linear layers (module paths, e.g. "model.layers.3.mlp.down_proj") kept at int8.
    int8_modules: frozenset[str] = frozenset()

    def __post_init__(self) -> None:
        if self.mode not in QUANT_MODES:
            raise ValueError(f"quantization mode {self.mode!r} is not one of {QUANT_MODES}")
        if self.mode == "int4" and self.group_size not in (32, 64, 128, 256):
            raise ValueError(f"int4 group_size must be 32, 64, 128 or 256 (got {self.group_size})")
        if self.method not in QUANT_METHODS:
            raise ValueError(f"quantization method {self.method!r} is not one of {QUANT_METHODS}")
        if isinstance(self.int8_modules, str) or not all(isinstance(m, str) for m in self.int8_modules):
            raise ValueError(f"int8_modules must be a collection of module paths (got {self.int8_modules!r})")
        object.__setattr__(self, "int8_modules", frozenset(self.int8_modules))  # accept lists, stay hashable
        if self.int8_modules and self.mode != "int4":
            raise ValueError(f"int8_modules keeps layers of an int4 model at int8; mode is {self.mode!r}")

    def for_module(self, module_name: str) -> "QuantConfig":
        """The configuration one layer is stored and run with: int8 for the int8_modules, else self."""
        if module_name in self.int8_modules:
            return QuantConfig("int8", include_lm_head=self.include_lm_head, method=self.method)
        return self

    def describe(self) -> str:
        """A short human-readable summary, for messages ("int4 (group 32, gptq, 5 layers int8)")."""
        if self.mode == "int8":
            return f"int8 ({self.method})"
        extra = f", {len(self.int8_modules)} layers int8" if self.int8_modules else ""
        return f"int4 (group {self.group_size}, {self.method}{extra})"

    def applies_to(self, module_name: str) -> bool:
        """Which linear layers are quantized: every projection, and the LM head unless excluded."""
        if module_name == "lm_head":
            return self.include_lm_head
        return module_name.startswith("model.layers.")

    def to_dict(self) -> dict:
        """The `quantization_config` entry of a quantized checkpoint's config.json."""
        return {"quant_method": "qwen2-weight-only", "mode": self.mode, "group_size": self.group_size,
                "include_lm_head": self.include_lm_head, "method": self.method,
                "int8_modules": sorted(self.int8_modules)}

    @classmethod
    def from_dict(cls, data: dict) -> "QuantConfig":
        if not isinstance(data, dict) or data.get("quant_method") != "qwen2-weight-only":
            raise ValueError(f"quantization_config {data!r} is not a qwen2 weight-only quantization")
        # Checkpoints written before `method` / `int8_modules` existed are plain RTN, all int4.
        int8_modules = data.get("int8_modules", [])
        if not isinstance(int8_modules, list):
            raise ValueError(f"quantization_config int8_modules must be a list of module paths (got {int8_modules!r})")
        return cls(mode=data.get("mode"), group_size=data.get("group_size", 32),
                   include_lm_head=bool(data.get("include_lm_head", True)), method=data.get("method", "rtn"),
                   int8_modules=frozenset(int8_modules))


def quantize_weight(weight: torch.Tensor, config: QuantConfig, *, rows_per_chunk: int = 4096) -> dict[str, torch.Tensor]:
    """Portable quantized tensors for a float weight (out, in):
    int8 -> {"qweight": int8 (out, in), "scales": float32 (out,)};
    int4 -> {"qweight": uint8 (out, in/2), "scales", "zeros": float32 (out, in/G)}.

    Works through `rows_per_chunk` output rows at a time, so quantizing the 151,936-row LM head
    needs float temporaries of a few MB rather than several copies of the whole matrix.
    """
    out_features, in_features = weight.shape
    if config.mode == "int4" and in_features % config.group_size:
        raise ValueError(f"in_features {in_features} is not a multiple of the int4 group size {config.group_size}")
    out: dict[str, torch.Tensor] = {}
    for i in range(0, out_features, rows_per_chunk):  # filled in place: no list of pieces + a concatenated copy
        piece = _quantize_rows(weight[i:i + rows_per_chunk].detach().float(), config)
        for key, value in piece.items():
            if key not in out:
                out[key] = torch.empty((out_features, *value.shape[1:]), dtype=value.dtype)
            out[key][i:i + value.shape[0]] = value
    return out


def int8_scales(w: torch.Tensor) -> torch.Tensor:
    """Symmetric int8 scale of each row of a float (out, in) weight: absmax / 127."""
    return (w.abs().amax(dim=1) / 127).clamp(min=1e-10)


def int4_group_params(w_OgG: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(scales, zeros) of int4 groups (..., G): the 16 levels span each group's [min, max] exactly."""
    lo, hi = w_OgG.amin(-1), w_OgG.amax(-1)
    return ((hi - lo) / 15).clamp(min=1e-10), lo


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """uint8 (out, in/2) from int4 codes (out, in) in [0, 15]: even column in the low nibble."""
    q = q.to(torch.uint8)
    return q[:, 0::2] | (q[:, 1::2] << 4)


def _quantize_rows(w: torch.Tensor, config: QuantConfig) -> dict[str, torch.Tensor]:
    if config.mode == "int8":
        scales = int8_scales(w)
        return {"qweight": torch.round(w / scales[:, None]).clamp(-127, 127).to(torch.int8), "scales": scales}
    rows, G = w.shape[0], config.group_size
    w_OgG = w.view(rows, -1, G)
    scales, zeros = int4_group_params(w_OgG)
    q = torch.round((w_OgG - zeros[..., None]) / scales[..., None]).clamp(0, 15).view(rows, -1)
    return {"qweight": pack_int4(q), "scales": scales, "zeros": zeros}


def dequantize_weight(tensors: dict[str, torch.Tensor], config: QuantConfig) -> torch.Tensor:
    """The float weight the portable tensors stand for (the reference the kernels are tested against)."""
    q = tensors["qweight"]
    if config.mode == "int8":
        return q.float() * tensors["scales"][:, None].float()
    nibbles = torch.stack((q & 0xF, q >> 4), dim=-1).view(q.shape[0], -1).float()
    G = config.group_size
    w_OgG = nibbles.view(q.shape[0], -1, G) * tensors["scales"][..., None].float() + tensors["zeros"][..., None].float()
    return w_OgG.view(q.shape[0], -1)


class Int8Linear(nn.Module):
    """y = x @ (q * scale).T + bias, with int8 q read directly by `torch._weight_int8pack_mm`."""

    def __init__(self, tensors: dict[str, torch.Tensor], bias: torch.Tensor | None, dtype: torch.dtype) -> None:
        super().__init__()
        self.out_features, self.in_features = tensors["qweight"].shape
        # Own, freshly allocated (64-byte aligned) memory: tensors from safetensors may be views into a
        # file mapping at any offset, and the packed int8 kernel crashes on misaligned weights.
        self.register_buffer("qweight", tensors["qweight"].to(torch.int8).clone(memory_format=torch.contiguous_format))
        self.register_buffer("scales", tensors["scales"].to(dtype).contiguous())
        self.bias = nn.Parameter(bias.to(dtype), requires_grad=False) if bias is not None else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        if x.device.type == "cpu" and x.numel() // self.in_features < DEQUANTIZE_FROM_ROWS:
            y = torch._weight_int8pack_mm(x.reshape(-1, self.in_features), self.qweight, self.scales.to(x.dtype))
            y = y.view(*shape[:-1], self.out_features)
        else:  # many rows, or other devices: dequantize (one pass) and run one float GEMM
            weight = torch.mul(self.qweight, self.scales[:, None].to(x.dtype),
                               out=_scratch(self.qweight.shape, x.dtype, x))
            y = F.linear(x, weight)
        return y + self.bias if self.bias is not None else y


class Int4Linear(nn.Module):
    """y = x @ (q * scale + min).T + bias via `_weight_int4pack_mm_for_cpu` (weights repacked at build)."""

    def __init__(self, tensors: dict[str, torch.Tensor], bias: torch.Tensor | None, dtype: torch.dtype,
                 group_size: int) -> None:
        super().__init__()
        q = tensors["qweight"]
        self.out_features, self.in_features = q.shape[0], q.shape[1] * 2
        self.group_size = group_size
        self.register_buffer("packed", _pack_int4(q))
        # The kernel computes (q - 8) * scale + zero_point, so the zero point is min + 8 * scale.
        scales, zeros = tensors["scales"].float(), tensors["zeros"].float()
        self.register_buffer("scales_and_zeros",
                             torch.stack((scales.t(), (zeros + 8 * scales).t()), dim=-1).to(dtype).contiguous())
        self.bias = nn.Parameter(bias.to(dtype), requires_grad=False) if bias is not None else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x_MK = x.reshape(-1, self.in_features)
        if x_MK.shape[0] >= DEQUANTIZE_FROM_ROWS and self.out_features % 64 == 0 and _int4_layout_known():
            y = x_MK @ self.dequantized_t(x.dtype, out=_scratch((self.in_features, self.out_features), x.dtype, x))
        else:
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(x_MK, self.packed, self.group_size,
                                                           self.scales_and_zeros.to(x.dtype))
        y = y.view(*shape[:-1], self.out_features)
        return y + self.bias if self.bias is not None else y

    def dequantized_t(self, dtype: torch.dtype, out: torch.Tensor | None = None) -> torch.Tensor:
        """The float weight, transposed (K, N), straight from the kernel's packed layout: one pass
        in C where the C kernels are built (qwen2.kernels), else `dequantized_t_torch`. Written into
        `out` when given (and the C kernel runs)."""
        result = kernels.dequantize_int4_t(self.packed, self.scales_and_zeros, self.out_features, self.in_features,
                                           self.group_size, dtype, out)
        return result if result is not None else self.dequantized_t_torch(dtype)

    def dequantized_t_torch(self, dtype: torch.dtype) -> torch.Tensor:
        """`dequantized_t` in PyTorch ops (three passes over the weight instead of one).

        The CPU kernel stores blocks of 64 output rows: for each input column k, 32 bytes whose low
        nibbles are rows 0-31 of the block and high nibbles rows 32-63. Unpacked in that order the
        result is W^T one block at a time, so one permuting copy gives W^T (checked against the
        kernel at first use by _int4_layout_known).
        """
        N, K, G = self.out_features, self.in_features, self.group_size
        p = self.packed.view(N // 64, K, 32)
        q = torch.cat((p & 0xF, p >> 4), 2).to(dtype).view(N // 64, K // G, G, 64)
        sz = self.scales_and_zeros.to(dtype)  # (K/G, N, 2): w = (q - 8) * scale + zero = q * scale + offset
        # scale and offset in the same block order (small: one per group), contiguous so that the
        # fused multiply-add writes a contiguous result
        scale = sz[..., 0].view(K // G, N // 64, 64).permute(1, 0, 2)[:, :, None].contiguous()
        offset = (sz[..., 1] - 8 * sz[..., 0]).view(K // G, N // 64, 64).permute(1, 0, 2)[:, :, None].contiguous()
        return torch.addcmul(offset, q, scale).view(N // 64, K, 64).permute(1, 0, 2).reshape(K, N)


def _pack_int4(q: torch.Tensor, rows_per_chunk: int = 4096) -> torch.Tensor:  # rows_per_chunk: a multiple of 64
    """The CPU kernel's packed layout of portable nibbles (out, in/2). The kernel packs blocks of 64
    output rows independently, so packing 4096 rows at a time gives the same bytes while the int32
    input it wants exists for one chunk only (for the 151,936-row head it was 545 MB at once)."""
    packed = None
    for start in range(0, q.shape[0], rows_per_chunk):
        chunk = q[start:start + rows_per_chunk]
        nibbles = torch.stack((chunk & 0xF, chunk >> 4), dim=-1).view(chunk.shape[0], -1).to(torch.int32)
        piece = torch.ops.aten._convert_weight_to_int4pack_for_cpu(nibbles, _INNER_K_TILES)
        if packed is None:
            packed = torch.empty((q.shape[0], *piece.shape[1:]), dtype=piece.dtype)
        packed[start:start + piece.shape[0]] = piece
    return packed


# From this many rows (prefill chunks, big batches) dequantizing the weight and running one float
# GEMM beats the packed kernels, whose cost grows linearly with the rows: measured on one core for a
# 4864 x 896 int4 weight, 512 rows take 27.7 ms packed vs 13.8 ms dequantized (128 rows: 6.8 vs 6.6;
# 64 rows: 3.4 vs 3.5; dequantized with PyTorch ops, before the C kernel made that part 3x faster).
# Decode (one row per sequence) always uses the packed kernels.
DEQUANTIZE_FROM_ROWS = 128


class _Scratch(threading.local):
    buffer: torch.Tensor | None = None


_SCRATCH = _Scratch()
SCRATCH_MAX_BYTES = 64 << 20


def _scratch(shape: tuple[int, ...], dtype: torch.dtype, x: torch.Tensor) -> torch.Tensor | None:
    """A reusable buffer for a weight dequantized for one GEMM, or None (allocate a fresh one).

    A freshly allocated weight of 17 MB costs more in page faults than dequantizing it (glibc hands
    a freed block at the top of the heap straight back to the OS, so every prefill GEMM faulted its
    weight in again: 350 of the 1,150 ms of a 512-token int4 prefill). One buffer per thread, grown
    to the largest weight up to SCRATCH_MAX_BYTES and reused, costs that once. Not when autograd
    may keep the weight for a backward pass, which the next layer would overwrite.
    """
    numel = math.prod(shape)
    size = numel * dtype.itemsize
    if x.device.type != "cpu" or size > SCRATCH_MAX_BYTES or (torch.is_grad_enabled() and x.requires_grad):
        return None
    buffer = _SCRATCH.buffer
    if buffer is None or buffer.numel() * buffer.dtype.itemsize < size:
        buffer = _SCRATCH.buffer = torch.empty(size, dtype=torch.uint8)
    return buffer[:size].view(dtype).view(shape)


@functools.cache
def _int4_layout_known() -> bool:
    """Does this PyTorch pack int4 weights the way Int4Linear.dequantized_t reads them? (It is the
    kernel's private layout, so check once on a small matrix rather than trust it.)"""
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(64, 64, generator=gen)
    config = QuantConfig("int4", group_size=32)
    layer = Int4Linear(quantize_weight(w, config), None, torch.float32, 32)
    return torch.allclose(layer.dequantized_t(torch.float32), dequantize_weight(quantize_weight(w, config), config).t(),
                          atol=1e-5)


def quantized_linear(tensors: dict[str, torch.Tensor], bias: torch.Tensor | None, config: QuantConfig,
                     dtype: torch.dtype) -> nn.Module:
    if config.mode == "int8":
        return Int8Linear(tensors, bias, dtype)
    return Int4Linear(tensors, bias, dtype, config.group_size)


class QuantizedEmbedding(nn.Module):
    """A token embedding stored as quantized rows: int8 rows of its own, or, in a tied model, the
    quantized LM head's rows (the same matrix).

    The float embedding is the largest tensor of a small model (272 MB in bf16 for the 0.5B one),
    and a step only looks up a few rows of it. Untied models keep int8 rows (one scale per row:
    the error is far below that of int8 projections); tied models read the head's int8 / int4
    rows, so the matrix is stored once. A borrowed head is referenced, not registered, so it is
    moved and counted once, as the LM head.
    """

    def __init__(self, rows: "Int8Linear | Int4Linear", dtype: torch.dtype, *, owned: bool) -> None:
        super().__init__()
        self.num_embeddings, self.embedding_dim = rows.out_features, rows.in_features
        self.dtype = dtype
        if owned:
            self.rows = rows
        else:
            object.__setattr__(self, "rows", rows)

    @staticmethod
    def supports(rows: nn.Module | None) -> bool:
        if isinstance(rows, Int8Linear):
            return True
        return isinstance(rows, Int4Linear) and rows.out_features % 64 == 0 and _int4_layout_known()

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        rows, flat = self.rows, ids.reshape(-1)
        if isinstance(rows, Int8Linear):
            out = rows.qweight[flat].to(self.dtype) * rows.scales[flat, None].to(self.dtype)
        else:  # the packed layout (see Int4Linear.dequantized_t): row n is nibble n % 64 of block n // 64
            K, G = rows.in_features, rows.group_size
            block, within = flat // 64, flat % 64
            byte = rows.packed.view(-1, K, 32)[block, :, within % 32]  # (M, K)
            q = torch.where((within < 32)[:, None], byte & 0xF, byte >> 4).to(self.dtype)
            sz = rows.scales_and_zeros[:, flat].to(self.dtype)  # (K/G, M, 2)
            scale, zero = sz[..., 0].t()[:, :, None], sz[..., 1].t()[:, :, None]  # (M, K/G, 1)
            out = ((q.view(-1, K // G, G) - 8) * scale + zero).view(-1, K)
        return out.view(*ids.shape, self.embedding_dim)


def quantize_embedding(weight: torch.Tensor, dtype: torch.dtype) -> QuantizedEmbedding:
    """int8 rows (one scale per row) for an untied model's embedding."""
    return QuantizedEmbedding(quantize_linear(weight, QuantConfig("int8"), dtype), dtype, owned=True)


def quantize_embedding_(model: nn.Module) -> None:
    """After the linears of `model` are quantized: store the embedding as quantized rows, the
    quantized head's own in a tied model (see QuantizedEmbedding)."""
    inner = model.model
    if not isinstance(inner.embed_tokens, nn.Embedding):
        return
    dtype = inner.embed_tokens.weight.dtype
    if model.config.tie_word_embeddings and QuantizedEmbedding.supports(model.lm_head):
        inner.embed_tokens = QuantizedEmbedding(model.lm_head, dtype, owned=False)
    else:
        inner.embed_tokens = quantize_embedding(inner.embed_tokens.weight, dtype)


# the dimension along which each runtime buffer follows the weight's output rows
_ROW_DIM = {"qweight": 0, "scales": 0, "packed": 0, "scales_and_zeros": 1}


def quantize_linear(weight: torch.Tensor, config: QuantConfig, dtype: torch.dtype, *,
                    rows_per_chunk: int = 4096) -> nn.Module:
    """`quantized_linear(quantize_weight(weight, config), None, config, dtype)`, built a block of
    output rows at a time into preallocated buffers: no portable copy of the whole matrix ever
    exists (for the 151,936-row head that copy and its packing were ~170 MB of load-time peak).
    Quantization is per row, so the result is identical. The bias is the caller's to attach."""
    out_features = weight.shape[0]
    layer, full = None, {}
    for start in range(0, out_features, rows_per_chunk):  # rows_per_chunk: a multiple of 64 (int4 packing)
        part = quantized_linear(quantize_weight(weight[start:start + rows_per_chunk], config), None, config, dtype)
        if layer is None:
            if part.out_features == out_features:
                return part
            layer = part
            for name, buf in part.named_buffers():
                shape = list(buf.shape)
                shape[_ROW_DIM[name]] = out_features
                full[name] = torch.empty(shape, dtype=buf.dtype)
        for name, buf in part.named_buffers():
            full[name].narrow(_ROW_DIM[name], start, part.out_features).copy_(buf)
    for name, buf in full.items():
        setattr(layer, name, buf)
    layer.out_features = out_features
    return layer


def fuse_projections_(model: nn.Module) -> None:
    """Merge each layer's quantized q/k/v into one layer and gate/up into another (concatenated
    output rows: every output is computed exactly as before), so a decode step makes 4 quantized
    matmuls per layer instead of 7 (batch-1 int4 decode 51.0 -> 53.7 tokens/s measured). Runtime
    only: the merged layers replace the separate ones, which checkpoints never see (saving needs
    the float model). Layers of different kinds (e.g. int8 v_proj under a GPTQ budget) stay apart."""
    for layer in getattr(getattr(model, "model", None), "layers", []):
        attn, mlp = layer.self_attn, layer.mlp
        if attn.qkv_proj is None and (fused := _concat_rows([attn.q_proj, attn.k_proj, attn.v_proj])) is not None:
            attn.qkv_proj = fused
            del attn.q_proj, attn.k_proj, attn.v_proj
        if mlp.gate_up_proj is None and (fused := _concat_rows([mlp.gate_proj, mlp.up_proj])) is not None:
            mlp.gate_up_proj = fused
            del mlp.gate_proj, mlp.up_proj
        # the separate layers' buffers are holes in the heap now: hand them back before the next
        # layer allocates (936 vs 963 MiB load peak for the demo model with int4 weights)
        return_freed_memory()


def _concat_rows(layers: list[nn.Module]) -> nn.Module | None:
    """One quantized layer whose output rows are the given layers' rows in order, or None if they
    are not all the same kind of quantized layer (int4 also needs whole blocks of 64 rows)."""
    first = layers[0]
    if not isinstance(first, (Int8Linear, Int4Linear)) or any(type(x) is not type(first) for x in layers):
        return None
    if isinstance(first, Int4Linear) and (any(x.group_size != first.group_size or x.out_features % 64 for x in layers)):
        return None
    fused = copy.copy(first)  # the same class and settings; buffers and bias replaced below
    fused._buffers = {name: torch.cat([x.get_buffer(name) for x in layers], _ROW_DIM[name])
                      for name in first._buffers}
    fused._parameters = dict(first._parameters)
    biases = [x.bias for x in layers]
    if any(b is not None for b in biases):
        if any(b is None for b in biases):
            return None
        fused.bias = nn.Parameter(torch.cat([b.detach() for b in biases]), requires_grad=False)
    fused.out_features = sum(x.out_features for x in layers)
    return fused


def quantize_(model: nn.Module, config: QuantConfig,
              tensors: dict[str, dict[str, torch.Tensor]] | None = None) -> nn.Module:
    """Replace the model's linear layers by quantized ones, in place, one layer at a time (so the
    float and quantized copies of only one layer coexist). A tied LM head becomes a quantized copy
    of the embedding; the embedding then becomes quantized rows (quantize_embedding_).

    `tensors` maps module paths to portable tensors computed elsewhere (GPTQ); every layer the
    config applies to must be in it. Without it each layer is rounded to nearest here."""
    targets = [name for name, m in model.named_modules() if isinstance(m, nn.Linear) and config.applies_to(name)]
    if tensors is not None and (missing := [name for name in targets if name not in tensors]):
        raise ValueError(f"no quantized tensors given for {len(missing)} layer(s), e.g. {missing[0]!r}")
    for name in targets:
        linear = model.get_submodule(name)
        layer_config = config.for_module(name)
        pieces = tensors[name] if tensors is not None else quantize_weight(linear.weight, layer_config)
        bias = linear.bias.detach() if linear.bias is not None else None
        model.set_submodule(name, quantized_linear(pieces, bias, layer_config, linear.weight.dtype))
    quantize_embedding_(model)
    fuse_projections_(model)
    return model
