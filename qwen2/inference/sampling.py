"""Sampling: pure functions from logits to the next token, plus the parameters that steer them.

Order of operations follows transformers: repetition penalty, then temperature, top-k, top-p,
min-p, then a draw. Temperature 0 means greedy (argmax), which skips every warper.

Shape legend: B batch, V vocab.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields, replace
from typing import Any

import torch


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0
    top_k: int = 0  # 0 = off
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    max_new_tokens: int = 256
    seed: int | None = None
    stop: tuple[str, ...] = field(default=())  # stop strings; stop token ids come from the tokenizer

    def __post_init__(self) -> None:
        def check(name: str, ok: bool, why: str) -> None:
            if not ok:
                raise ValueError(f"sampling parameter {name!r}: {why} (got {getattr(self, name)!r})")

        for name in ("temperature", "top_p", "min_p", "repetition_penalty"):
            value = getattr(self, name)
            check(name, not isinstance(value, bool) and isinstance(value, (int, float)), "must be a number")
        for name in ("top_k", "max_new_tokens"):
            value = getattr(self, name)
            check(name, not isinstance(value, bool) and isinstance(value, int), "must be an integer")
        check("seed", self.seed is None or (isinstance(self.seed, int) and not isinstance(self.seed, bool)),
              "must be an integer or null")
        check("temperature", math.isfinite(self.temperature) and self.temperature >= 0, "must be >= 0")
        check("top_k", isinstance(self.top_k, int) and self.top_k >= 0, "must be an integer >= 0")
        check("top_p", 0 < self.top_p <= 1, "must be in (0, 1]")
        check("min_p", 0 <= self.min_p < 1, "must be in [0, 1)")
        check("repetition_penalty", math.isfinite(self.repetition_penalty) and self.repetition_penalty > 0, "must be > 0")
        check("max_new_tokens", isinstance(self.max_new_tokens, int) and self.max_new_tokens >= 0, "must be >= 0")
        check("stop", all(isinstance(s, str) and s for s in self.stop), "must be non-empty strings")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @classmethod
    def from_generation_config(cls, generation_config: dict[str, Any], **overrides: Any) -> "SamplingParams":
        """Defaults from a checkpoint's generation_config.json (Qwen2.5-Instruct ships temperature,
        top_p, top_k and repetition_penalty there), then explicit overrides (None = keep).

        As in transformers, `do_sample: false` means greedy whatever the temperature says, and a
        sampling config that names no top_k gets transformers' default of 50.
        """
        known = {f.name for f in fields(cls)}
        values: dict[str, Any] = {}
        gc = generation_config or {}
        do_sample = gc.get("do_sample", False)
        if not isinstance(do_sample, bool):
            raise ValueError(f"generation_config 'do_sample' must be true or false (got {do_sample!r})")
        if do_sample:
            values["top_k"] = 50
            for key in ("temperature", "top_k", "top_p", "min_p"):
                if gc.get(key) is not None:
                    values[key] = gc[key]
        if gc.get("repetition_penalty") is not None:
            values["repetition_penalty"] = gc["repetition_penalty"]
        try:
            defaults = replace(cls(), **values)
        except ValueError as e:
            raise ValueError(f"generation_config: {e}") from None
        overrides = {k: v for k, v in overrides.items() if v is not None and k in known}
        if "stop" in overrides:
            overrides["stop"] = tuple(overrides["stop"])
        return replace(defaults, **overrides)


def apply_repetition_penalty(logits_BV: torch.Tensor, seen_BV: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL-style penalty on tokens already seen (prompt + output): divide positive logits, multiply negative."""
    if penalty == 1.0:
        return logits_BV
    penalised = torch.where(logits_BV > 0, logits_BV / penalty, logits_BV * penalty)
    return torch.where(seen_BV, penalised, logits_BV)


def filter_logits(logits_BV: torch.Tensor, *, top_k: int = 0, top_p: float = 1.0, min_p: float = 0.0) -> torch.Tensor:
    """Set logits outside the top-k / nucleus / min-p sets to -inf. Always keeps the best token."""
    if top_k > 0 and top_k < logits_BV.shape[-1]:
        kth_best = torch.topk(logits_BV, top_k, dim=-1).values[:, -1:]
        logits_BV = logits_BV.masked_fill(logits_BV < kth_best, -math.inf)
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits_BV, dim=-1, descending=True)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        # Drop a token once the mass *before* it already reaches top_p; the first always survives.
        drop_sorted = (cumulative - sorted_logits.softmax(-1)) >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits_BV = logits_BV.masked_fill(drop, -math.inf)
    if min_p > 0.0:
        probs = logits_BV.softmax(-1)
        threshold = probs.max(-1, keepdim=True).values * min_p
        logits_BV = logits_BV.masked_fill(probs < threshold, -math.inf)
    return logits_BV


def sample_next_token(logits_BV: torch.Tensor, params: SamplingParams, *, seen_BV: torch.Tensor | None = None,
                      generator: torch.Generator | None = None) -> torch.Tensor:
    """Next token ids (B,) from last-position logits (B, V)."""
    logits_BV = logits_BV.float()
    if seen_BV is not None:
        logits_BV = apply_repetition_penalty(logits_BV, seen_BV, params.repetition_penalty)
    if params.greedy:
        return logits_BV.argmax(-1)
    logits_BV = filter_logits(logits_BV / params.temperature, top_k=params.top_k, top_p=params.top_p,
                              min_p=params.min_p)
    return torch.multinomial(logits_BV.softmax(-1), 1, generator=generator).squeeze(-1)
