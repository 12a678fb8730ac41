"""Reference generation: prefill, then one token at a time from a static KV cache.

This is the slow, obvious path that everything faster is tested against. `generate_ids` works on
token ids for a batch of prompts (left-padded into one cache); `TextStream` layers text on top:
incremental UTF-8 decoding, stop strings, and finish reasons.

Shape legend: B batch, T prompt tokens, S cache slots, V vocab.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Iterator

import torch

from qwen2.inference.sampling import SamplingParams, sample_next_token
from qwen2.model import KVCache, Qwen2ForCausalLM
from qwen2.inference.detokenize import TextAssembler
from qwen2.tokenizer import Tokenizer


class ContextLengthError(ValueError):
    """The prompt does not fit in the model's context."""


def check_context(prompt_len: int, max_new_tokens: int, context: int) -> int:
    """Cache length to allocate; raises ContextLengthError if the prompt alone does not fit."""
    if prompt_len >= context:
        raise ContextLengthError(f"the prompt has {prompt_len} tokens; the model's context is {context} tokens "
                                 f"(leave room for at least one new token)")
    return min(prompt_len + max_new_tokens, context)


@torch.inference_mode()
def generate_ids(model: Qwen2ForCausalLM, prompts: list[list[int]], params: SamplingParams, *,
                 stop_ids: set[int] | frozenset[int] = frozenset(), pad_id: int = 0,
                 num_valid_tokens: int | None = None, done: list[bool] | None = None,
                 kv_cache_dtype: str = "auto") -> Iterator[list[int | None]]:
    """Yield, for each decode step, the new token of every row (None for rows that have finished).

    A row finishes when it samples a stop id (that id is still yielded), reaches
    max_new_tokens, or reaches the end of the context. `done` is the caller's list of per-row
    flags: the caller may set an entry to end a row early (e.g. a stop string matched); this
    function sets it when a row finishes.
    `num_valid_tokens` (the tokenizer's vocabulary size) keeps the padding rows of the embedding
    (ids 151665..151935 in Qwen2.5) from ever being sampled. `kv_cache_dtype="int8"` stores the
    cache quantized (about half the memory of bf16).
    """
    B = len(prompts)
    if B == 0:
        raise ValueError("no prompts given")
    if any(len(p) == 0 for p in prompts):
        raise ValueError("the prompt is empty")
    done = done if done is not None else [False] * B
    lengths = [len(p) for p in prompts]
    longest = max(lengths)
    max_seq_len = check_context(longest, params.max_new_tokens, model.config.max_position_embeddings)
    max_new = max_seq_len - longest
    device = model.device

    ids_BT = torch.full((B, longest), pad_id, dtype=torch.long)
    mask_BS = torch.zeros((B, max_seq_len), dtype=torch.long)
    for row, prompt in enumerate(prompts):  # left padding: every row's last prompt token is aligned
        ids_BT[row, longest - len(prompt):] = torch.tensor(prompt, dtype=torch.long)
        mask_BS[row, longest - len(prompt):] = 1
    mask_BS[:, longest:] = 1
    ids_BT, mask_BS = ids_BT.to(device), mask_BS.to(device)
    padded = min(lengths) != longest

    seen_BV = None
    if params.repetition_penalty != 1.0:
        seen_BV = torch.zeros((B, model.config.vocab_size), dtype=torch.bool, device=device)
        for row, prompt in enumerate(prompts):  # per row: padding must not mark (or unmark) pad_id
            seen_BV[row, torch.tensor(prompt, device=device)] = True
    generator = None
    if params.seed is not None:
        generator = torch.Generator(device=device).manual_seed(params.seed)

    cache = KVCache.allocate(model.config, batch_size=B, max_seq_len=max_seq_len, dtype=model.dtype, device=device,
                             kv_cache_dtype=kv_cache_dtype)
    logits_BV = model(ids_BT, attention_mask_BS=mask_BS[:, :longest] if padded else None,
                      kv_cache=cache, logits_to_keep=1)[:, -1]
    for step in range(max_new):
        if num_valid_tokens is not None and num_valid_tokens < logits_BV.shape[-1]:
            logits_BV[:, num_valid_tokens:] = -float("inf")
        next_B = sample_next_token(logits_BV, params, seen_BV=seen_BV, generator=generator)
        tokens = next_B.tolist()
        out: list[int | None] = []
        for row, token in enumerate(tokens):
            if done[row]:
                out.append(None)
                continue
            out.append(token)
            if token in stop_ids or step + 1 >= max_new:
                done[row] = True
        yield out
        if all(done) or step + 1 == max_new:
            return
        if seen_BV is not None:
            seen_BV.scatter_(1, next_B[:, None], True)
        logits_BV = model(next_B[:, None], attention_mask_BS=mask_BS[:, :cache.length + 1] if padded else None,
                          kv_cache=cache)[:, -1]


@dataclass
class TextStream:
    """Iterate to receive text chunks of one completion; afterwards read the result fields.

    Stop strings: text is held back while it could still be the start of a stop string, and a
    matched stop string (and everything after it) is never emitted. Stop token ids end the
    stream without being decoded.
    """

    model: Qwen2ForCausalLM
    tokenizer: Tokenizer
    prompt_ids: list[int]
    params: SamplingParams
    stop_ids: frozenset[int] | None = None  # default: the tokenizer's stop ids + config.json's eos ids
    kv_cache_dtype: str = "auto"
    completion_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None  # "stop" or "length" once finished
    text: str = ""
    started_at: float | None = None  # perf_counter() stamps, for reporting speed
    first_token_at: float | None = None
    finished_at: float | None = None

    def __iter__(self) -> Iterator[str]:
        if self.started_at is not None:
            raise RuntimeError("a TextStream can be iterated only once")
        self.started_at = time.perf_counter()
        stop_ids = self.stop_ids
        if stop_ids is None:
            stop_ids = frozenset(self.tokenizer.stop_ids) | set(self.model.config.eos_token_ids)
        assembler = TextAssembler(self.tokenizer, self.params.stop)
        self.finish_reason = "length"
        for (token,) in generate_ids(self.model, [self.prompt_ids], self.params, stop_ids=stop_ids,
                                     pad_id=self.tokenizer.pad_token_id or 0,
                                     num_valid_tokens=self.tokenizer.vocab_size,
                                     kv_cache_dtype=self.kv_cache_dtype):
            if self.first_token_at is None:
                self.first_token_at = time.perf_counter()
            if token in stop_ids:
                self.finish_reason = "stop"
                break
            self.completion_ids.append(token)
            chunk = assembler.push(token)
            if chunk:
                self.text += chunk
                yield chunk
            if assembler.stopped:
                break
        chunk = assembler.finish()
        if assembler.stopped:
            self.finish_reason = "stop"
        self.finished_at = time.perf_counter()
        if chunk:
            self.text += chunk
            yield chunk


def generate_text(model: Qwen2ForCausalLM, tokenizer: Tokenizer, prompt_ids: list[int],
                  params: SamplingParams) -> TextStream:
    """Run a completion to the end and return the finished stream (text, ids, finish_reason)."""
    stream = TextStream(model, tokenizer, prompt_ids, params)
    for _ in stream:
        pass
    return stream
