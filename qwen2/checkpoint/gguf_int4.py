"""GGUF 4-bit blocks read straight into our int4 format, with no rounding.

llama.cpp's Q4_0, Q4_1 and Q4_K blocks are, after decoding their block headers, groups of 32
weights w = q * scale + min with q in [0, 15] — exactly what an int4 layer with group size 32
stores (qwen2.model.quant). Requantizing the dequantized floats instead would pick a new grid per
group (spanning the group's actual min and max, which the file's codes need not reach) and round
every weight a second time. Q5_0, Q6_K or Q8_0 tensors have more levels than int4 and are
quantized as usual.

Layouts (ggml-quants.c; per block, little endian):
- Q4_0 (32 weights, 18 bytes): d f16, 16 bytes of nibbles; w = d * (q - 8).
- Q4_1 (32 weights, 20 bytes): d f16, m f16, 16 bytes of nibbles; w = d * q + m.
  In both, byte j holds weight j (low nibble) and weight j + 16 (high nibble).
- Q4_K (256 weights, 144 bytes): d f16, dmin f16, 12 bytes of 6-bit (scale, min) codes for the
  8 sub-blocks of 32, 128 bytes of nibbles; w = d * sc_s * q - dmin * m_s. Byte 32c + l holds
  weight 64c + l (low nibble, sub-block 2c) and weight 64c + 32 + l (high nibble, sub-block 2c + 1).
"""

from __future__ import annotations

import numpy as np
import torch

from qwen2.model.quant import pack_int4

GROUP = 32  # every supported block type is groups of 32: only int4 layers with group size 32 can take them
_Q4_0, _Q4_1, _Q4_K = 2, 3, 12  # GGMLQuantizationType values
BLOCK_BYTES = {_Q4_0: 18, _Q4_1: 20, _Q4_K: 144}
BLOCK_WEIGHTS = {_Q4_0: 32, _Q4_1: 32, _Q4_K: 256}


def is_int4_grid(qtype: int) -> bool:
    """Whether tensors of this GGML type import into int4 (group 32) without rounding."""
    return qtype in BLOCK_BYTES


def decode_int4_blocks(raw_RB: np.ndarray, qtype: int, cols: int) -> dict[str, torch.Tensor]:
    """Portable int4 tensors (qweight uint8 (rows, cols/2), scales and zeros float32 (rows, cols/32))
    for `rows` rows of raw blocks (uint8 (rows, bytes per row)) of a Q4_0 / Q4_1 / Q4_K tensor."""
    rows = raw_RB.shape[0]
    blocks = raw_RB.reshape(rows, cols // BLOCK_WEIGHTS[qtype], BLOCK_BYTES[qtype])
    if qtype in (_Q4_0, _Q4_1):
        d = blocks[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float32)
        if qtype == _Q4_0:
            scales, zeros, qs = d, -8 * d, blocks[..., 2:18]
        else:
            scales, zeros, qs = d, blocks[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float32), blocks[..., 4:20]
        q = np.concatenate([qs & 0xF, qs >> 4], axis=-1)  # (rows, blocks, 32): weights 0-15 then 16-31
    elif qtype == _Q4_K:
        d = blocks[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float32)
        dmin = blocks[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float32)
        sc, mn = _k_scale_min(blocks[..., 4:16])
        scales = d[..., None] * sc  # (rows, blocks, 8 sub-blocks)
        zeros = -(dmin[..., None] * mn)
        qs = blocks[..., 16:144].reshape(rows, -1, 4, 32)  # 4 chunks of 32 bytes = 64 weights each
        q = np.stack([qs & 0xF, qs >> 4], axis=3)  # (rows, blocks, chunk, low/high, 32)
    else:
        raise ValueError(f"GGML type {qtype} is not a 4-bit block type")
    q = torch.from_numpy(np.ascontiguousarray(q).reshape(rows, cols))
    return {"qweight": pack_int4(q),
            "scales": torch.from_numpy(np.ascontiguousarray(scales, dtype=np.float32).reshape(rows, cols // GROUP)),
            "zeros": torch.from_numpy(np.ascontiguousarray(zeros, dtype=np.float32).reshape(rows, cols // GROUP))}


def _k_scale_min(packed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The 8 (scale, min) 6-bit codes of Q4_K blocks from their 12 packed bytes (..., 12), as float32.
    Sub-blocks 0-3: low 6 bits of bytes 0-3 (scale) and 4-7 (min). Sub-blocks 4-7: low / high nibble
    of bytes 8-11, with the top 2 bits taken from the high bits of bytes 0-3 / 4-7."""
    b = packed.astype(np.uint8)
    lo_sc, lo_mn = b[..., 0:4] & 63, b[..., 4:8] & 63
    hi_sc = (b[..., 8:12] & 0xF) | ((b[..., 0:4] >> 6) << 4)
    hi_mn = (b[..., 8:12] >> 4) | ((b[..., 4:8] >> 6) << 4)
    sc = np.concatenate([lo_sc, hi_sc], axis=-1).astype(np.float32)
    mn = np.concatenate([lo_mn, hi_mn], axis=-1).astype(np.float32)
    return sc, mn
