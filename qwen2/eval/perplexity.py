"""Perplexity of a causal LM over a token stream, in non-overlapping windows.

Each window of `seq_len` tokens is scored independently (no context carried across windows), the
standard fixed-window protocol; perplexity = exp(total NLL / scored tokens). Also reports how
often the model's greedy choice matches a reference model's (`compare` with the same windows).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm import tqdm

from qwen2.model import KVCache


@dataclass
class PerplexityResult:
    perplexity: float
    nll: float  # mean negative log-likelihood per scored token (nats)
    num_tokens: int
    greedy_ids: list[torch.Tensor]  # argmax per scored position, per window (for agreement checks)


@torch.inference_mode()
def perplexity(model: torch.nn.Module, token_ids: list[int], *, seq_len: int = 512, max_windows: int | None = None,
               progress: bool = False, kv_cache_dtype: str | None = None, chunk: int = 64) -> PerplexityResult:
    """With `kv_cache_dtype` ("auto" or "int8"), each window is fed through a KV cache in chunks of
    `chunk` tokens, so attention reads keys and values back from the cache (how a quantized cache
    is evaluated); without it, each window is one plain forward."""
    if seq_len < 2:
        raise ValueError("seq_len must be at least 2")
    ids = torch.tensor(token_ids, dtype=torch.long)
    windows = [ids[i:i + seq_len] for i in range(0, len(ids) - 1, seq_len)]
    windows = [w for w in windows if len(w) >= 2][:max_windows]
    if not windows:
        raise ValueError(f"need at least 2 tokens, got {len(token_ids)}")
    total_nll, total_tokens, greedy = 0.0, 0, []
    for window in tqdm(windows, desc="perplexity", disable=not progress):
        if kv_cache_dtype is None:
            logits = model(window[None].to(model.device))[0, :-1].float()
        else:
            cache = KVCache.allocate(model.config, batch_size=1, max_seq_len=len(window), dtype=model.dtype,
                                     device=model.device, kv_cache_dtype=kv_cache_dtype)
            pieces = [model(window[None, i:i + chunk].to(model.device), kv_cache=cache)[0]
                      for i in range(0, len(window), chunk)]
            logits = torch.cat(pieces)[:-1].float()
        targets = window[1:].to(logits.device)
        total_nll += F.cross_entropy(logits, targets, reduction="sum").item()
        total_tokens += len(targets)
        greedy.append(logits.argmax(-1).cpu())
    nll = total_nll / total_tokens
    return PerplexityResult(math.exp(nll), nll, total_tokens, greedy)


def greedy_agreement(a: PerplexityResult, b: PerplexityResult) -> float:
    """Fraction of scored positions where two models' argmax tokens agree."""
    same = sum(int((x == y).sum()) for x, y in zip(a.greedy_ids, b.greedy_ids))
    return same / sum(len(x) for x in a.greedy_ids)
