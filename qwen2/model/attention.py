"""Grouped-query self-attention with QKV bias and RoPE; the one attention of the project (SDPA).

Shape legend: B batch, T new tokens, S cached + new positions, D hidden size, H query heads,
K kv heads, C head dim.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from qwen2.config import Qwen2Config
from qwen2.model.kv_cache import KVCache
from qwen2.model.paged_kv_cache import PagedBatch
from qwen2.model.rope import apply_rope


class Attention(nn.Module):
    def __init__(self, config: Qwen2Config, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.dim_per_head
        self.dropout = config.attention_dropout
        D, H, K, C = config.hidden_size, self.num_heads, self.num_kv_heads, self.head_dim
        # Qwen2: bias on q/k/v, none on o_proj.
        self.q_proj = nn.Linear(D, H * C, bias=True)
        self.k_proj = nn.Linear(D, K * C, bias=True)
        self.v_proj = nn.Linear(D, K * C, bias=True)
        self.o_proj = nn.Linear(H * C, D, bias=False)

    def forward(self, x_BTD: torch.Tensor, cos_BTC: torch.Tensor, sin_BTC: torch.Tensor, *,
                mask_B1TS: torch.Tensor | None, is_causal: bool, kv_cache: KVCache | PagedBatch | None) -> torch.Tensor:
        B, T, _ = x_BTD.shape
        H, K, C = self.num_heads, self.num_kv_heads, self.head_dim
        q_BHTC = self.q_proj(x_BTD).view(B, T, H, C).transpose(1, 2)
        k_BKTC = self.k_proj(x_BTD).view(B, T, K, C).transpose(1, 2)
        v_BKTC = self.v_proj(x_BTD).view(B, T, K, C).transpose(1, 2)
        q_BHTC = apply_rope(q_BHTC, cos_BTC, sin_BTC)
        k_BKTC = apply_rope(k_BKTC, cos_BTC, sin_BTC)
        if kv_cache is not None:
            k_BKSC, v_BKSC = kv_cache.update(self.layer_idx, k_BKTC, v_BKTC)
        else:
            k_BKSC, v_BKSC = k_BKTC, v_BKTC
        # Query head h reads kv head h // (H / K), as transformers' repeat_kv does; SDPA's
        # enable_gqa does the same grouping without materialising the repeated keys.
        out_BHTC = F.scaled_dot_product_attention(
            q_BHTC, k_BKSC, v_BKSC, attn_mask=mask_B1TS, is_causal=is_causal,
            dropout_p=self.dropout if self.training else 0.0, enable_gqa=H != K,
        )
        return self.o_proj(out_BHTC.transpose(1, 2).reshape(B, T, H * C))
