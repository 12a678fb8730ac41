"""Stand-in models for fast generation tests (importable: conftest modules are not)."""

from __future__ import annotations

import dataclasses

import torch

from qwen2.config import PRESETS
from qwen2.model import KVCache


class ScriptedModel(torch.nn.Module):
    """Stands in for Qwen2ForCausalLM in generation tests: whatever the input, the logits put all
    mass on the next token of a fixed script (like nanochat's MockModel, but deterministic)."""

    def __init__(self, script: list[int], vocab_size: int = 512, baseline: float = -10.0, **config_overrides) -> None:
        super().__init__()
        self.baseline = baseline
        self.config = dataclasses.replace(PRESETS["tiny"], vocab_size=vocab_size, **config_overrides)
        self.script = script
        self.calls = 0
        self.anchor = torch.nn.Parameter(torch.zeros(1))

    @property
    def device(self) -> torch.device:
        return self.anchor.device

    @property
    def dtype(self) -> torch.dtype:
        return self.anchor.dtype

    def forward(self, input_ids_BT, *, positions_BT=None, attention_mask_BS=None, kv_cache: KVCache | None = None,
                logits_to_keep: int = 0):
        B, T = input_ids_BT.shape
        if kv_cache is not None:
            kv_cache.advance(T)
        token = self.script[min(self.calls, len(self.script) - 1)]
        self.calls += 1
        logits = torch.full((B, logits_to_keep or T, self.config.vocab_size), self.baseline)
        logits[..., token] = 10.0
        return logits
