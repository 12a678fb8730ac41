"""KVCache: preallocated key/value buffers for incremental decoding, in float or int8.

The caller allocates the cache (it knows the batch size and how long sequences may grow); the
attention layers write into it through `update`, and only the top-level model forward advances
`length`, once per forward, after every layer has written. Rows of a batch share one length:
shorter prompts are left-padded and the padding is masked out by the attention mask.

int8 caches: values get one scale per group of KV_GROUP channels of each (token, head) vector;
keys get one scale per channel (as in KIVI), fixed at the layer's first write. Qwen2's keys carry a
few huge channels (the k_proj bias), so any scale shared across channels leaves the others with
almost no resolution: whole-vector key scales cost +7.5% perplexity on the demo model, groups of 16
+6.4%. `update` returns dequantized tensors in the compute dtype, so attention is the same code
either way.

Shape legend: L layers, B batch, K kv heads, S cache slots, T new tokens, C head dim.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from qwen2.config import Qwen2Config

KV_CACHE_DTYPES = ("auto", "int8")
KV_GROUP = 16  # value channels per int8 scale
KEY_HEADROOM = 1.25  # key scales allow later tokens 25% more than the first write's largest pair norm
# Decode attention reads the keys in lengths rounded up to this many slots, masking the extra ones
# (qwen2.model.attention.decode_attention says why), so caches hold whole buckets of finite values.
KEY_BUCKET = 128


def round_to_bucket(n: int) -> int:
    return -(-n // KEY_BUCKET) * KEY_BUCKET


@dataclass
class KVCache:
    k_LBKSC: torch.Tensor
    v_LBKSC: torch.Tensor
    length: int = 0
    # int8 caches only: the scales, and the dtype attention computes in
    k_scale_LBKC: torch.Tensor | None = None  # keys: one float32 scale per channel
    v_scale_LBKSg: torch.Tensor | None = None  # values: g = C / KV_GROUP scales per vector
    compute_dtype: torch.dtype | None = None
    # the sequence length the caller allocated for (before rounding to buckets): length-adaptive
    # YaRN picks its scale from it once, so every token of the sequence is rotated alike
    planned_len: int = 0

    @classmethod
    def allocate(cls, config: Qwen2Config, *, batch_size: int, max_seq_len: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
                 kv_cache_dtype: str = "auto") -> "KVCache":
        """`dtype` is the compute dtype; kv_cache_dtype "auto" stores in it, "int8" quantizes. The slots
        are `max_seq_len` rounded up to a whole KEY_BUCKET, zero-filled (attention may read them)."""
        if kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ValueError(f"kv_cache_dtype {kv_cache_dtype!r} is not one of {KV_CACHE_DTYPES}")
        shape = (config.num_hidden_layers, batch_size, config.num_key_value_heads, round_to_bucket(max_seq_len),
                 config.dim_per_head)
        if kv_cache_dtype == "int8":
            if config.dim_per_head % KV_GROUP:
                raise ValueError(f"int8 KV cache needs a head dim divisible by {KV_GROUP}")
            scale_shape = (*shape[:-1], config.dim_per_head // KV_GROUP)
            return cls(torch.zeros(shape, dtype=torch.int8, device=device),
                       torch.zeros(shape, dtype=torch.int8, device=device),
                       k_scale_LBKC=torch.zeros((*shape[:3], shape[4]), dtype=torch.float32, device=device),
                       v_scale_LBKSg=torch.zeros(scale_shape, dtype=dtype, device=device), compute_dtype=dtype,
                       planned_len=max_seq_len)
        return cls(torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device),
                   planned_len=max_seq_len)

    @property
    def quantized(self) -> bool:
        return self.k_scale_LBKC is not None

    @property
    def batch_size(self) -> int:
        return self.k_LBKSC.shape[1]

    @property
    def max_seq_len(self) -> int:
        return self.k_LBKSC.shape[3]

    def bytes_per_token(self) -> int:
        """Bytes of cache one token occupies across all layers (keys + values, one batch row)."""
        L, _, K, _, C = self.k_LBKSC.shape
        per_vector = C * self.k_LBKSC.element_size()
        if not self.quantized:
            return 2 * L * K * per_vector
        # key scales are per channel, not per token; values carry C / KV_GROUP scales per vector
        return L * K * (2 * per_vector + self.v_scale_LBKSg.shape[-1] * self.v_scale_LBKSg.element_size())

    def update(self, layer_idx: int, k_BKTC: torch.Tensor, v_BKTC: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write the new keys/values after the cached ones; return all S = length + T slots (views for
        a float cache, dequantized copies for an int8 one)."""
        start, end = self.length, self.length + k_BKTC.shape[2]
        if end > self.max_seq_len:
            raise ValueError(f"KV cache overflow: {end} positions needed, {self.max_seq_len} allocated")
        if not self.quantized:
            self.k_LBKSC[layer_idx, :, :, start:end] = k_BKTC
            self.v_LBKSC[layer_idx, :, :, start:end] = v_BKTC
            return self.k_LBKSC[layer_idx, :, :, :end], self.v_LBKSC[layer_idx, :, :, :end]
        B, K, T, C = k_BKTC.shape
        # Keys: one scale per channel, fixed by the first write to this layer. RoPE rotates channel i
        # with channel i + C/2, so the scale comes from the norm of that pair, which rotation keeps.
        if start == 0:
            k32 = k_BKTC.float()
            pair_norm_BKc = (k32[..., :C // 2].square() + k32[..., C // 2:].square()).sqrt().amax(2)
            scale_BKC = (torch.cat((pair_norm_BKc, pair_norm_BKc), -1) * KEY_HEADROOM / 127).clamp(min=1e-8)
            self.k_scale_LBKC[layer_idx] = scale_BKC
        scale_BKC = self.k_scale_LBKC[layer_idx]
        self.k_LBKSC[layer_idx, :, :, start:end] = torch.round(k_BKTC.float() / scale_BKC[:, :, None]).clamp(
            -127, 127).to(torch.int8)
        # dequantized a whole bucket at a time, returned as views of `end` slots (decode_attention
        # reads on to the bucket's end)
        wide = min(round_to_bucket(end), self.max_seq_len)
        k_BKSC = self.k_LBKSC[layer_idx, :, :, :wide].to(self.compute_dtype) * scale_BKC[:, :, None].to(self.compute_dtype)
        # Values: one scale per group of KV_GROUP channels of each (token, head) vector.
        v_BKTgG = v_BKTC.float().view(B, K, T, C // KV_GROUP, KV_GROUP)
        scale_BKTg = (v_BKTgG.abs().amax(-1) / 127).clamp(min=1e-8)
        self.v_LBKSC[layer_idx, :, :, start:end] = torch.round(v_BKTgG / scale_BKTg[..., None]).to(torch.int8).view(
            B, K, T, C)
        self.v_scale_LBKSg[layer_idx, :, :, start:end] = scale_BKTg.to(self.v_scale_LBKSg.dtype)
        q_BKSgG = self.v_LBKSC[layer_idx, :, :, :wide].view(B, K, wide, C // KV_GROUP, KV_GROUP)
        v_BKSC = (q_BKSgG.to(self.compute_dtype) * self.v_scale_LBKSg[layer_idx, :, :, :wide, :, None]).view(B, K, wide, C)
        return k_BKSC[:, :, :end], v_BKSC[:, :, :end]

    def advance(self, num_new_tokens: int) -> None:
        self.length += num_new_tokens
