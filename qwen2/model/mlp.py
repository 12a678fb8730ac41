"""The SwiGLU feed-forward block of every Qwen2 dense layer: down(silu(gate(x)) * up(x)), no biases."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from qwen2.config import Qwen2Config


class MLP(nn.Module):
    def __init__(self, config: Qwen2Config) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)
        self.gate_up_proj: nn.Module | None = None  # gate/up merged, in quantized runtime models only

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate_up_proj is not None:  # one matmul (qwen2.model.quant.fuse_projections_)
            gate, up = self.gate_up_proj(x).chunk(2, -1)
            return self.down_proj(F.silu(gate) * up)
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
