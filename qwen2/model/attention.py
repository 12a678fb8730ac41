"""Grouped-query self-attention with QKV bias and RoPE; the one attention of the project (SDPA, or
Dual Chunk Attention past the trained context: qwen2.model.dca; sparse prefill of long prompts:
qwen2.model.sparse).

Shape legend: B batch, T new tokens, S cached + new positions, D hidden size, H query heads,
K kv heads, C head dim.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from qwen2.config import Qwen2Config
from qwen2.model.dca import DCARotary
from qwen2.model.kv_cache import KVCache, round_to_bucket
from qwen2.model.paged_kv_cache import PagedBatch
from qwen2.model.rope import apply_rope
from qwen2.model.sparse import SparsePrefill


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
        self.qkv_proj: nn.Module | None = None  # q/k/v merged, in quantized runtime models only

    def forward(self, x_BTD: torch.Tensor, cos_BTC: torch.Tensor, sin_BTC: torch.Tensor, *,
                mask_B1TS: torch.Tensor | None, is_causal: bool, kv_cache: KVCache | PagedBatch | None,
                dca: DCARotary | None = None, sparse: SparsePrefill | None = None) -> torch.Tensor:
        B, T, _ = x_BTD.shape
        H, K, C = self.num_heads, self.num_kv_heads, self.head_dim
        if self.qkv_proj is not None:  # quantized runtime models: one matmul (qwen2.model.quant.fuse_projections_)
            q_BTX, k_BTX, v_BTX = self.qkv_proj(x_BTD).split((H * C, K * C, K * C), -1)
        else:
            q_BTX, k_BTX, v_BTX = self.q_proj(x_BTD), self.k_proj(x_BTD), self.v_proj(x_BTD)
        q_BHTC = q_BTX.reshape(B, T, H, C).transpose(1, 2)
        k_BKTC = k_BTX.reshape(B, T, K, C).transpose(1, 2)
        v_BKTC = v_BTX.reshape(B, T, K, C).transpose(1, 2)
        if dca is not None:  # Dual Chunk Attention: keys at their place in a chunk, queries three ways
            k_BKTC = dca.keys(k_BKTC)
        else:
            q_BHTC = apply_rope(q_BHTC, cos_BTC, sin_BTC)
            k_BKTC = apply_rope(k_BKTC, cos_BTC, sin_BTC)
        if kv_cache is not None:
            k_BKSC, v_BKSC = kv_cache.update(self.layer_idx, k_BKTC, v_BKTC)
        else:
            k_BKSC, v_BKSC = k_BKTC, v_BKTC
        # Query head h reads kv head h // (H / K), as transformers' repeat_kv does.
        if dca is not None:
            out_BHTC = dca.attend(q_BHTC, k_BKSC, v_BKSC)
        elif sparse is not None:  # a long causal prefill, no mask (the model decides when: qwen2.model.sparse)
            out_BHTC = sparse.attend(q_BHTC, k_BKSC, v_BKSC)
        elif T == 1 and not self.training:
            out_BHTC = decode_attention(q_BHTC, k_BKSC, v_BKSC, mask_B1TS)
        else:  # SDPA's enable_gqa does the grouping without materialising the repeated keys
            out_BHTC = F.scaled_dot_product_attention(
                q_BHTC, k_BKSC, v_BKSC, attn_mask=mask_B1TS, is_causal=is_causal,
                dropout_p=self.dropout if self.training else 0.0, enable_gqa=H != K,
            )
        return self.o_proj(out_BHTC.transpose(1, 2).reshape(B, T, H * C))


def decode_attention(q_BH1C: torch.Tensor, k_BKSC: torch.Tensor, v_BKSC: torch.Tensor,
                     mask_B11S: torch.Tensor | None) -> torch.Tensor:
    """Attention of one new query per row, as two batched matmuls over the G = H / K query heads
    that share a kv head: (B, K, G, C) @ (B, K, C, S). Same result as SDPA; on CPU, SDPA's bf16
    kernel is built for long query blocks and spends about 10x longer on a single query (measured
    3.4 ms vs 0.24 ms for 16 rows x 190 keys), which was a third of a batched decode step.

    The matmuls run over the keys rounded up to a multiple of KEY_BUCKET slots, the extra ones
    masked out, whenever the cache's storage extends that far (both caches keep finite values there:
    zeros or older keys). PyTorch's bf16 CPU matmul (oneDNN) builds and keeps a kernel per shape, at
    about 0.7 MB each: with a new key length every step, a 128-token reply added 145 MB to the
    process and a server kept growing by the contexts it had seen (up to oneDNN's 1,024 cached
    kernels). Rounded lengths give one shape per KEY_BUCKET tokens.
    """
    B, H, _, C = q_BH1C.shape
    K, S = k_BKSC.shape[1], k_BKSC.shape[2]
    S_pad = round_to_bucket(S)
    k_wide, v_wide = _widened(k_BKSC, S_pad), _widened(v_BKSC, S_pad)
    if k_wide is not None and v_wide is not None and S_pad != S:
        k_BKSC, v_BKSC = k_wide, v_wide
        valid_1S = torch.arange(S_pad, device=q_BH1C.device)[None] < S
        if mask_B11S is None:
            mask_B11S = valid_1S.view(1, 1, 1, S_pad)
        else:
            mask_B11S = F.pad(mask_B11S.view(mask_B11S.shape[0], S), (0, S_pad - S)).view(-1, 1, 1, S_pad)
        S = S_pad
    scores_BKGS = (q_BH1C.view(B, K, H // K, C) @ k_BKSC.transpose(-1, -2)).float() * C ** -0.5
    if mask_B11S is not None:
        scores_BKGS = scores_BKGS.masked_fill(~mask_B11S.view(mask_B11S.shape[0], 1, 1, S), -torch.inf)
    probs_BKGS = scores_BKGS.softmax(-1).to(v_BKSC.dtype)
    return (probs_BKGS @ v_BKSC).view(B, H, 1, C)


def _widened(x_BKSC: torch.Tensor, S_pad: int) -> torch.Tensor | None:
    """The same view with S_pad slots, reading on into its storage, or None if the storage ends
    first. (Slots past the view belong to the cache: later positions, or the next head's, all finite.)"""
    if x_BKSC.shape[2] == S_pad:
        return x_BKSC
    size = (*x_BKSC.shape[:2], S_pad, x_BKSC.shape[3])
    last = x_BKSC.storage_offset() + sum((n - 1) * st for n, st in zip(size, x_BKSC.stride()))
    if min(x_BKSC.stride()) < 0 or last >= x_BKSC.untyped_storage().nbytes() // x_BKSC.element_size():
        return None
    return x_BKSC.as_strided(size, x_BKSC.stride(), x_BKSC.storage_offset())
