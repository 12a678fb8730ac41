"""LoRA (Hu et al. 2021): a frozen linear layer plus a trainable low-rank update, merged on export.

y = base(x) + (alpha / r) * B(A(dropout(x))), A: (r, in) random, B: (out, r) zeros, so training
starts exactly at the base model. Only A and B train (a 0.5B model's optimizer state shrinks from
gigabytes to megabytes). `adapters_disabled(model)` runs the base model alone: DPO's reference
policy without a second copy of the weights. `merge_lora_` folds B @ A into the base weights and
restores plain nn.Linear layers, so the exported checkpoint is an ordinary Qwen2 model.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class LoRAConfig:
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: tuple[str, ...] = DEFAULT_TARGETS  # module names (the last part of the path)

    def __post_init__(self) -> None:
        if self.r < 1:
            raise ValueError(f"LoRA r must be at least 1 (got {self.r})")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"LoRA dropout must be in [0, 1) (got {self.dropout})")
        unknown = set(self.targets) - set(DEFAULT_TARGETS)
        if unknown:
            raise ValueError(f"LoRA targets {sorted(unknown)} are not Qwen2 projections {DEFAULT_TARGETS}")


class LoRALinear(nn.Module):
    def __init__(self, base: nn.Linear, config: LoRAConfig, generator: torch.Generator | None = None) -> None:
        super().__init__()
        self.base = base
        for p in base.parameters():
            p.requires_grad_(False)
        self.scale = config.alpha / config.r
        self.dropout = config.dropout
        self.enabled = True
        self.lora_A = nn.Parameter(torch.empty(config.r, base.in_features, dtype=base.weight.dtype))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, config.r, dtype=base.weight.dtype))
        bound = 1 / math.sqrt(base.in_features)  # kaiming-uniform(a=sqrt(5)), as nn.Linear and PEFT
        with torch.no_grad():
            self.lora_A.uniform_(-bound, bound, generator=generator)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        if not self.enabled:
            return y
        h = F.dropout(x, self.dropout, self.training) if self.dropout else x
        return y + F.linear(F.linear(h, self.lora_A), self.lora_B) * self.scale

    def merged_weight(self) -> torch.Tensor:
        return self.base.weight + (self.lora_B @ self.lora_A) * self.scale


def apply_lora_(model: nn.Module, config: LoRAConfig, *, seed: int = 0) -> int:
    """Wrap the target projections of every decoder layer in place and freeze everything else.
    Returns the number of trainable parameters."""
    for p in model.parameters():
        p.requires_grad_(False)
    generator = torch.Generator().manual_seed(seed)
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.Linear) and name.rsplit(".", 1)[-1] in config.targets and ".layers." in f".{name}":
            model.set_submodule(name, LoRALinear(module, config, generator))
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def lora_layers(model: nn.Module) -> Iterator[LoRALinear]:
    return (m for m in model.modules() if isinstance(m, LoRALinear))


@contextlib.contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[None]:
    layers = list(lora_layers(model))
    for layer in layers:
        layer.enabled = False
    try:
        yield
    finally:
        for layer in layers:
            layer.enabled = True


def merge_lora_(model: nn.Module) -> nn.Module:
    """Replace every LoRALinear by an nn.Linear holding base + (alpha / r) B @ A; all parameters
    trainable again (a plain model)."""
    for name, module in list(model.named_modules()):
        if isinstance(module, LoRALinear):
            base = module.base
            with torch.no_grad():
                base.weight.copy_(module.merged_weight())
            model.set_submodule(name, base)
    for p in model.parameters():
        p.requires_grad_(True)
    return model


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}


def parse_targets(value: Sequence[str] | str) -> tuple[str, ...]:
    return tuple(value.split(",")) if isinstance(value, str) else tuple(value)
