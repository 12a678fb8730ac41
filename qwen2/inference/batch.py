"""Sampling k responses per conversation through the batching engine, reproducibly (synthesis, evaluation).

Every synthesis method asks the same thing of the model: for each prompt, k samples (or one
greedy answer). All requests go through one `Engine`, so the k samples of a prompt share its
prefix blocks and prompts are decoded together; each sample has its own seed, derived from the
run's seed, the prompt's index and the sample's index, so a run is repeatable and any one sample
can be regenerated alone.
"""

from __future__ import annotations

import hashlib
import sys
from dataclasses import dataclass, replace

from qwen2.inference.engine import Engine, EngineConfig
from qwen2.inference.sampling import SamplingParams
from qwen2.tokenizer.chat import encode_chat


@dataclass
class Sample:
    text: str
    finish_reason: str
    tokens: int
    seed: int | None


def sample_seed(seed: int, prompt: int, sample: int) -> int:
    digest = hashlib.sha256(f"{seed}/{prompt}/{sample}".encode()).digest()
    return int.from_bytes(digest[:4], "little")


def sample_chats(pretrained, conversations: list[list[dict]], *, k: int, params: SamplingParams, seed: int = 0,
                 engine_config: EngineConfig | None = None, progress: bool = True,
                 description: str = "sampling") -> list[list[Sample]]:
    """k samples for each conversation (a reply to its last user turn); greedy params give k
    identical ones, so use k = 1 for them. Returns the samples per conversation, in order."""
    if k < 1:
        raise ValueError(f"k must be at least 1 (got {k})")
    from tqdm import tqdm

    tokenizer = pretrained.tokenizer
    config = engine_config or EngineConfig(max_batch_size=16, max_queue=1 << 30, kv_cache_tokens=1 << 15)
    prompts = [encode_chat(tokenizer, messages, add_generation_prompt=True) for messages in conversations]
    results: list[list[Sample | None]] = [[None] * k for _ in prompts]
    bar = tqdm(total=len(prompts) * k, desc=description, unit="sample", disable=not progress, file=sys.stderr)
    with Engine(pretrained.model, tokenizer, config) as engine:
        handles = []
        for i, prompt in enumerate(prompts):
            for j in range(k):
                seed_ij = None if params.greedy else sample_seed(seed, i, j)
                handles.append((i, j, seed_ij, engine.submit(prompt, replace(params, seed=seed_ij))))
        for i, j, seed_ij, handle in handles:
            text, ids, last = handle.result()
            if last.finish_reason == "error":
                raise RuntimeError(f"generation failed for prompt {i}: {last.error}")
            results[i][j] = Sample(text, last.finish_reason, len(ids), seed_ij)
            bar.update(1)
    bar.close()
    return results  # type: ignore[return-value]
