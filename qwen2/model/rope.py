"""Rotary position embeddings in the Hugging Face "rotate half" layout, plus YaRN frequencies.

The rotation pairs dimension i with i + C/2 (NeoX style, not interleaved pairs), which is what the
Qwen2 checkpoints were trained with, so weights load without any permutation.

Shape legend: B batch, T tokens, H heads, C head dim, c = C/2 (one frequency per rotated pair).
"""

from __future__ import annotations

import math

import torch

from qwen2.config import Qwen2Config


def default_inv_freq(head_dim: int, theta: float) -> torch.Tensor:
    """inv_freq[i] = 1 / theta^(2i/C), i = 0..C/2-1, in float32 (as transformers computes it)."""
    # Explicit CPU device: the model may be built under a meta-device context, but these are
    # derived constants, never loaded, so they must hold real values.
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64, device="cpu").float() / head_dim
    return 1.0 / (theta ** exponents)


def yarn_inv_freq(head_dim: int, theta: float, rope_scaling: dict, original_max_positions: int, *,
                  factor: float | None = None) -> tuple[torch.Tensor, float]:
    """YaRN (static): blend interpolated and original frequencies; returns (inv_freq, attention_scaling).

    Follows the YaRN paper / vLLM semantics: `factor` comes from the config and the correction
    range from `original_max_position_embeddings` (some transformers versions overwrite the factor,
    transformers#38224; we do not). `factor` given here overrides the config's (length-adaptive YaRN).
    """
    factor = float(rope_scaling["factor"]) if factor is None else float(factor)
    if factor <= 1:
        return default_inv_freq(head_dim, theta), 1.0  # no scaling at all: exactly plain RoPE
    beta_fast = float(rope_scaling.get("beta_fast") or 32)
    beta_slow = float(rope_scaling.get("beta_slow") or 1)
    original = int(rope_scaling.get("original_max_position_embeddings") or original_max_positions)

    def dim_for_rotations(num_rotations: float) -> float:
        # The dimension index whose wavelength fits `num_rotations` turns within `original` positions.
        return (head_dim * math.log(original / (num_rotations * 2 * math.pi))) / (2 * math.log(theta))

    low = max(math.floor(dim_for_rotations(beta_fast)), 0)
    high = min(math.ceil(dim_for_rotations(beta_slow)), head_dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = ((torch.arange(head_dim // 2, dtype=torch.float32, device="cpu") - low) / (high - low)).clamp(0, 1)
    extrapolation = default_inv_freq(head_dim, theta)
    interpolation = extrapolation / factor
    inv_freq = interpolation * ramp + extrapolation * (1 - ramp)
    attention_factor = rope_scaling.get("attention_factor")
    if attention_factor is None:
        attention_factor = 0.1 * math.log(factor) + 1.0 if factor > 1 else 1.0
    return inv_freq, float(attention_factor)


def rope_parameters(config: Qwen2Config) -> tuple[torch.Tensor, float]:
    """(inv_freq [C/2] float32, attention_scaling) for the config's rope type."""
    head_dim, theta = config.dim_per_head, float(config.rope_theta)
    rope_type = config.rope_type
    if rope_type == "default":
        return default_inv_freq(head_dim, theta), 1.0
    if rope_type == "linear":
        return default_inv_freq(head_dim, theta) / float(config.rope_scaling["factor"]), 1.0
    if rope_type == "yarn":
        return yarn_inv_freq(head_dim, theta, config.rope_scaling, config.max_position_embeddings)
    raise ValueError(f"unsupported rope type {rope_type!r}")


def yarn_scale_for_length(config: Qwen2Config, length: int) -> float:
    """Length-adaptive YaRN (`rope_scaling.length_adaptive`): the scale a sequence of `length` tokens
    needs, length / original context, at least 1 (short inputs get plain RoPE, which the Qwen docs
    warn static YaRN would not give them) and at most the config's factor."""
    rs = config.rope_scaling or {}
    original = int(rs.get("original_max_position_embeddings") or config.max_position_embeddings)
    return min(float(rs["factor"]), max(1.0, length / original))


def is_length_adaptive(config: Qwen2Config) -> bool:
    return config.rope_type == "yarn" and bool((config.rope_scaling or {}).get("length_adaptive"))


def rope_cos_sin(positions_BT: torch.Tensor, inv_freq: torch.Tensor, attention_scaling: float,
                 dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of shape (B, T, C) for integer positions; angles in float32, then cast to `dtype`."""
    freqs_BTc = positions_BT.to(torch.float32)[..., None] * inv_freq.to(positions_BT.device)  # (B, T, C/2)
    emb_BTC = torch.cat((freqs_BTc, freqs_BTc), dim=-1)
    return (emb_BTC.cos() * attention_scaling).to(dtype), (emb_BTC.sin() * attention_scaling).to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x_BHTC: torch.Tensor, cos_BTC: torch.Tensor, sin_BTC: torch.Tensor) -> torch.Tensor:
    cos, sin = cos_BTC[:, None], sin_BTC[:, None]  # broadcast over heads
    return x_BHTC * cos + rotate_half(x_BHTC) * sin
