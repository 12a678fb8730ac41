"""KVCache: preallocated key/value buffers for incremental decoding.

The caller allocates the cache (it knows the batch size and how long sequences may grow); the
attention layers write into it through `update`, and only the top-level model forward advances
`length`, once per forward, after every layer has written. Rows of a batch share one length:
shorter prompts are left-padded and the padding is masked out by the attention mask.

Shape legend: L layers, B batch, K kv heads, S cache slots, T new tokens, C head dim.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from qwen2.config import Qwen2Config


@dataclass
class KVCache:
    k_LBKSC: torch.Tensor
    v_LBKSC: torch.Tensor
    length: int = 0

    @classmethod
    def allocate(cls, config: Qwen2Config, *, batch_size: int, max_seq_len: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> "KVCache":
        shape = (config.num_hidden_layers, batch_size, config.num_key_value_heads, max_seq_len, config.dim_per_head)
        return cls(torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device))

    @property
    def batch_size(self) -> int:
        return self.k_LBKSC.shape[1]

    @property
    def max_seq_len(self) -> int:
        return self.k_LBKSC.shape[3]

    def bytes_per_token(self) -> int:
        """Bytes of cache one token occupies across all layers (keys + values, one batch row)."""
        L, _, K, _, C = self.k_LBKSC.shape
        return 2 * L * K * C * self.k_LBKSC.element_size()

    def update(self, layer_idx: int, k_BKTC: torch.Tensor, v_BKTC: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write the new keys/values after the cached ones; return views of all S = length + T slots."""
        start, end = self.length, self.length + k_BKTC.shape[2]
        if end > self.max_seq_len:
            raise ValueError(f"KV cache overflow: {end} positions needed, {self.max_seq_len} allocated")
        self.k_LBKSC[layer_idx, :, :, start:end] = k_BKTC
        self.v_LBKSC[layer_idx, :, :, start:end] = v_BKTC
        return self.k_LBKSC[layer_idx, :, :, :end], self.v_LBKSC[layer_idx, :, :, :end]

    def advance(self, num_new_tokens: int) -> None:
        self.length += num_new_tokens
