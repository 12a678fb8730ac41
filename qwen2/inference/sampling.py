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


# With top-k off, top-p / min-p first look at this many best tokens, and fall back to sorting the
# whole vocabulary only when those do not cover the nucleus (a full sort of 151,936 logits costs
# ~12 ms per row on this CPU, which would dominate a 16-stream decode step).
NUCLEUS_CANDIDATES = 1024


def candidate_distribution(logits_BV: torch.Tensor, params: SamplingParams) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The filtered next-token distribution as (probs (B, C), token ids (B, C)) over a few candidates,
    equal to softmax(filter_logits(logits / temperature)) (which is zero outside them). None when
    the candidates cannot be shown to hold every token the filters keep (then use the full path).

    Top-k keeps the k best (then top-p / min-p act on them, normalised among them, as in the
    reference order). Without top-k, top-p is decided with probabilities normalised over the whole
    vocabulary, which the log-sum-exp of all logits gives without sorting them.
    """
    V = logits_BV.shape[-1]
    logits_BV = logits_BV / params.temperature
    if params.top_k > 0:
        values_BC, ids_BC = torch.topk(logits_BV, min(params.top_k, V), dim=-1)
        log_norm_B1 = values_BC.logsumexp(-1, keepdim=True)
    elif params.top_p < 1.0 or params.min_p > 0.0:
        values_BC, ids_BC = torch.topk(logits_BV, min(NUCLEUS_CANDIDATES, V), dim=-1)
        log_norm_B1 = logits_BV.logsumexp(-1, keepdim=True)
    else:
        return None
    probs_BC = (values_BC - log_norm_B1).exp()
    keep_BC = torch.ones_like(probs_BC, dtype=torch.bool)
    if params.top_p < 1.0:
        before_BC = probs_BC.cumsum(-1) - probs_BC  # mass of the better tokens
        keep_BC &= before_BC < params.top_p
        # every kept token must be a candidate: the candidates' mass must reach top_p by itself
        if params.top_k == 0 and V > values_BC.shape[-1] and bool((probs_BC.sum(-1) < params.top_p).any()):
            return None
    if params.min_p > 0.0:
        # relative to the best token, so the normalisation does not matter
        keep_BC &= values_BC - values_BC[:, :1] >= math.log(params.min_p)
        if params.top_k == 0 and params.top_p == 1.0 and V > values_BC.shape[-1] and bool(
                (values_BC[:, -1] - values_BC[:, 0] >= math.log(params.min_p)).any()):
            return None  # the threshold reaches past the candidates
    keep_BC[:, 0] = True  # the best token always survives
    probs_BC = probs_BC * keep_BC
    return probs_BC / probs_BC.sum(-1, keepdim=True), ids_BC


def sample_next_token(logits_BV: torch.Tensor, params: SamplingParams, *, seen_BV: torch.Tensor | None = None,
                      generator: torch.Generator | None = None) -> torch.Tensor:
    """Next token ids (B,) from last-position logits (B, V)."""
    logits_BV = logits_BV.float()
    if seen_BV is not None:
        logits_BV = apply_repetition_penalty(logits_BV, seen_BV, params.repetition_penalty)
    if params.greedy:
        return logits_BV.argmax(-1)
    candidates = candidate_distribution(logits_BV, params)
    if candidates is not None:
        probs_BC, ids_BC = candidates
        return ids_BC.gather(-1, torch.multinomial(probs_BC, 1, generator=generator)).squeeze(-1)
    logits_BV = filter_logits(logits_BV / params.temperature, top_k=params.top_k, top_p=params.top_p,
                              min_p=params.min_p)
    return torch.multinomial(logits_BV.softmax(-1), 1, generator=generator).squeeze(-1)
