"""Engine: continuous batching over a paged KV cache, in one background thread.

Requests join and leave between forward passes. Each step the scheduler
1. retires cancelled requests (their blocks go back to the pool at once),
2. admits waiting requests while the batch has room and the pool has blocks for their prompts,
   reusing cached blocks of a shared prompt prefix,
3. runs one prefill chunk (at most `prefill_chunk` tokens of one request), so a long prompt never
   stalls the streams that are already decoding for more than one chunk,
4. runs one decode step for every request that has its prompt in the cache, all rows together.

Every request has its own sampling parameters, stop ids and strings, seed (its own generator, so
a seeded request gives the same tokens whatever else is in the batch, up to float rounding) and
repetition-penalty state. When the pool runs out of blocks mid-decode, the newest request is
preempted: its blocks are freed and it is re-queued first in line, to be recomputed from its
prompt plus what it has generated (its text stream continues where it was).

Results reach the caller through a RequestHandle, iterated synchronously or with `async for`.

Shape legend: B batch, T new tokens, V vocab.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import queue
import secrets
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import AsyncIterator, Iterator

import torch

from qwen2.inference.detokenize import TextAssembler
from qwen2.inference.generate import ContextLengthError
from qwen2.inference.sampling import SamplingParams, sample_next_token
from qwen2.model import Qwen2ForCausalLM
from qwen2.model.paged_kv_cache import BlockPool, PagedKVCache
from qwen2.model.rope import is_length_adaptive, yarn_scale_for_length
from qwen2.sysmem import return_freed_memory
from qwen2.tokenizer import Tokenizer

log = logging.getLogger(__name__)


class QueueFullError(RuntimeError):
    """The engine's waiting queue is full; try again later."""


class EngineClosedError(RuntimeError):
    """The engine has been shut down."""


@dataclass(frozen=True)
class EngineConfig:
    max_batch_size: int = 16  # sequences decoded together
    max_queue: int = 64  # waiting requests beyond which submit() refuses
    kv_cache_tokens: int = 65536  # pool size; only blocks in use cost memory
    block_size: int = 16
    kv_cache_dtype: str = "auto"  # or "int8"
    prefill_chunk: int = 512  # prompt tokens per forward
    prefix_caching: bool = True
    idle_cache_tokens: int = 8192  # cached prefix tokens kept when idle; the rest is returned to the OS

    def __post_init__(self) -> None:
        for name in ("max_batch_size", "max_queue", "kv_cache_tokens", "block_size", "prefill_chunk"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"engine setting {name!r} must be a positive integer (got {value!r})")


@dataclass
class Output:
    """One event of a request: new text (maybe empty) and tokens; the last one has finish_reason."""

    text: str
    token_ids: list[int]
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str | None = None  # "stop", "length", "cancelled" or "error"
    error: str | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


class RequestHandle:
    """The caller's side of a request: iterate (sync or async) over Outputs, or cancel."""

    def __init__(self, request_id: int, engine: "Engine", loop: asyncio.AbstractEventLoop | None) -> None:
        self.request_id = request_id
        self._engine = engine
        self._loop = loop
        self._queue: asyncio.Queue[Output] | queue.Queue[Output] = asyncio.Queue() if loop else queue.Queue()
        self.cancelled = False

    def cancel(self) -> None:
        """Stop generating; the request's cache blocks are freed before the next forward pass."""
        self.cancelled = True
        self._engine._wake()

    def _put(self, out: Output) -> None:
        if self._loop is None:
            self._queue.put(out)
            return
        try:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, out)
        except RuntimeError:  # the consumer's event loop is gone: nobody will read this request
            self.cancelled = True

    def __iter__(self) -> Iterator[Output]:
        while True:
            out = self._queue.get()
            yield out
            if out.finished:
                return

    async def __aiter__(self) -> AsyncIterator[Output]:
        while True:
            out = await self._queue.get()
            yield out
            if out.finished:
                return

    def result(self) -> tuple[str, list[int], Output]:
        """Block until finished; return (text, completion token ids, final output)."""
        text, ids = [], []
        for out in self:
            text.append(out.text)
            ids += out.token_ids
        return "".join(text), ids, out


@dataclass
class _Request:
    id: int
    handle: RequestHandle
    params: SamplingParams
    stop_ids: frozenset[int]
    tokens: list[int]  # prompt + generated
    prompt_len: int
    max_len: int  # stop ("length") once len(tokens) reaches this
    assembler: TextAssembler
    generator: torch.Generator
    seen_V: torch.Tensor | None
    key_scale_LKC: torch.Tensor | None
    table: list[int] = field(default_factory=list)
    block_hashes: list[bytes] = field(default_factory=list)
    cache_namespace: bytes = b""  # prefix blocks are shared only within one (length-adaptive YaRN: one scale)
    num_computed: int = 0  # tokens whose keys/values are in the cache
    submitted_at: float = field(default_factory=time.perf_counter)

    @property
    def num_generated(self) -> int:
        return len(self.tokens) - self.prompt_len

    @property
    def prefilled(self) -> bool:
        # decoding feeds the last sampled token; everything before it is in the cache
        return self.num_computed >= len(self.tokens) - 1 and self.num_generated > 0


class Engine:
    def __init__(self, model: Qwen2ForCausalLM, tokenizer: Tokenizer, config: EngineConfig = EngineConfig(), *,
                 stop_ids: frozenset[int] | None = None) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.config = config
        self.context = model.config.max_position_embeddings
        self.stop_ids = stop_ids if stop_ids is not None else (
            frozenset(tokenizer.stop_ids) | frozenset(model.config.eos_token_ids))
        P = config.block_size
        self.cache = PagedKVCache(model.config, num_blocks=-(-config.kv_cache_tokens // P) + 1, block_size=P,
                                  dtype=model.dtype, kv_cache_dtype=config.kv_cache_dtype)
        self.pool: BlockPool = self.cache.blocks
        self._ids = itertools.count()
        self._waiting: deque[_Request] = deque()
        self._running: list[_Request] = []  # admitted: prefilling or decoding, in admission order
        self._lock = threading.Lock()
        self._work = threading.Condition(self._lock)
        self._closed = False
        self._thread: threading.Thread | None = None
        self.steps = 0
        self.preemptions = 0
        self.prefix_tokens_reused = 0  # prompt tokens whose keys / values came from cached prefix blocks

    # ---- caller side -------------------------------------------------------------------------------

    def submit(self, prompt_ids: list[int], params: SamplingParams, *,
               loop: asyncio.AbstractEventLoop | None = None) -> RequestHandle:
        """Queue a request. Raises ContextLengthError (prompt too long), QueueFullError, EngineClosedError."""
        if not prompt_ids:
            raise ValueError("the prompt is empty")
        if len(prompt_ids) >= self.context:
            raise ContextLengthError(f"the prompt has {len(prompt_ids)} tokens; the model's context is "
                                     f"{self.context} tokens (leave room for at least one new token)")
        if len(prompt_ids) + 1 > self.cache.capacity_tokens():
            raise ContextLengthError(f"the prompt has {len(prompt_ids)} tokens; the engine's KV cache holds "
                                     f"{self.cache.capacity_tokens()}")
        vocab = self.model.config.vocab_size
        if any(not 0 <= t < vocab for t in prompt_ids):
            raise ValueError(f"prompt token ids must be in [0, {vocab})")
        with self._lock:
            if self._closed:
                raise EngineClosedError("the engine is shut down")
            if len(self._waiting) >= self.config.max_queue:
                raise QueueFullError(f"{len(self._waiting)} requests are already waiting")
            request_id = next(self._ids)
            handle = RequestHandle(request_id, self, loop)
            self._waiting.append(self._new_request(request_id, handle, list(prompt_ids), params))
            self._work.notify()
        return handle

    def start(self) -> "Engine":
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="qwen2-engine", daemon=True)
            self._thread.start()
        return self

    def close(self) -> None:
        """Stop the loop; unfinished requests end with finish_reason "cancelled"."""
        with self._lock:
            self._closed = True
            self._work.notify()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        for request in list(self._waiting) + self._running:
            self._finish(request, "cancelled")
        self._waiting.clear()
        self._running.clear()

    def __enter__(self) -> "Engine":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    def stats(self) -> dict:
        P = self.cache.block_size
        return {"running": len(self._running), "waiting": len(self._waiting), "steps": self.steps,
                "preemptions": self.preemptions, "prefix_tokens_reused": self.prefix_tokens_reused,
                "kv_blocks_used": self.pool.num_used, "kv_blocks_cached": self.pool.num_cached,
                "kv_tokens_capacity": self.cache.capacity_tokens(), "kv_block_size": P,
                "kv_bytes_per_token": self.cache.bytes_per_token(),
                "kv_bytes_in_use": (self.pool.num_used + self.pool.num_cached) * P * self.cache.bytes_per_token()}

    def _wake(self) -> None:
        with self._lock:
            self._work.notify()

    def _new_request(self, request_id: int, handle: RequestHandle, prompt: list[int],
                     params: SamplingParams) -> _Request:
        seed = params.seed if params.seed is not None else secrets.randbits(63)
        seen = None
        if params.repetition_penalty != 1.0:
            seen = torch.zeros(self.model.config.vocab_size, dtype=torch.bool)
            seen[torch.tensor(prompt)] = True
        key_scale = None
        if self.cache.quantized:
            c = self.model.config
            key_scale = torch.zeros(c.num_hidden_layers, c.num_key_value_heads, c.dim_per_head)
        # the pool's capacity too: a sequence longer than the whole pool could only ever preempt itself
        max_len = min(len(prompt) + params.max_new_tokens, self.context, self.cache.capacity_tokens())
        namespace = b""
        if is_length_adaptive(self.model.config):  # the RoPE scale is fixed by the planned length
            namespace = f"yarn scale {yarn_scale_for_length(self.model.config, max_len)!r}".encode()
        return _Request(request_id, handle, params, self.stop_ids, prompt, len(prompt), max_len=max_len,
                        assembler=TextAssembler(self.tokenizer, params.stop),
                        generator=torch.Generator().manual_seed(seed), seen_V=seen, key_scale_LKC=key_scale,
                        cache_namespace=namespace)

    # ---- the loop ----------------------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._lock:
                while not self._closed and not self._waiting and not self._running:
                    self._trim_idle_cache()
                    self._work.wait()
                if self._closed:
                    return
            try:
                self.step()
            except Exception as e:  # a failed forward must not kill the server: fail the batch, go on
                log.exception("engine step failed")
                for request in list(self._running):
                    self._finish(request, "error", error=f"{type(e).__name__}: {e}")

    @torch.inference_mode()
    def step(self) -> None:
        """One scheduling iteration (the background thread calls this; tests may call it directly)."""
        self.steps += 1
        self._retire_cancelled()
        self._admit()
        prefilling = next((r for r in self._running if not r.prefilled), None)
        if prefilling is not None:
            self._prefill_chunk(prefilling)
        decoding = [r for r in self._running if r.prefilled and r is not prefilling]
        if decoding:
            self._decode(decoding)

    def _retire_cancelled(self) -> None:
        with self._lock:
            for request in [r for r in self._waiting if r.handle.cancelled]:
                self._waiting.remove(request)
                self._finish(request, "cancelled")
        for request in [r for r in self._running if r.handle.cancelled]:
            self._finish(request, "cancelled")

    def _admit(self) -> None:
        P = self.cache.block_size
        while len(self._running) < self.config.max_batch_size:
            with self._lock:
                if not self._waiting:
                    return
                request = self._waiting[0]
            # keep one block per running sequence in reserve for its next decode token
            # blocks for its prompt, for the prompts still being prefilled, and one per running sequence
            # in reserve for its next decode token
            pending = sum(-(-len(r.tokens) // P) - len(r.table) for r in self._running if not r.prefilled)
            needed = -(-len(request.tokens) // P) + pending + len(self._running)
            if self.config.prefix_caching:
                request.table = self.pool.match_prefix(request.tokens, max_blocks=(len(request.tokens) - 1) // P,
                                                       namespace=request.cache_namespace)
                if request.table and self.cache.quantized:  # continue with the scales the prefix was written with
                    request.key_scale_LKC.copy_(self.cache.key_scale_of(request.table[-1]))
                request.num_computed = len(request.table) * P
                self.prefix_tokens_reused += request.num_computed
            if self.pool.num_available < needed - len(request.table):
                self.pool.release(request.table)
                request.table, request.num_computed = [], 0
                return
            with self._lock:
                self._waiting.popleft()
            self._running.append(request)

    def _ensure_blocks(self, request: _Request, num_tokens: int) -> bool:
        """Give `request` blocks for `num_tokens` slots, preempting the newest requests if the pool is
        out of blocks. False if `request` itself had to be preempted."""
        while len(request.table) * self.cache.block_size < num_tokens:
            if self.pool.num_available == 0:
                victim = self._running[-1]
                self._preempt(victim)
                if victim is request:
                    return False
                continue
            request.table.append(self.pool.allocate())
        return True

    def _prefill_chunk(self, request: _Request) -> None:
        start = request.num_computed
        chunk = request.tokens[start:start + self.config.prefill_chunk]
        if not self._ensure_blocks(request, start + len(chunk)):
            return
        batch = self.cache.batch([request.table], [start], len(chunk),
                                 [request.key_scale_LKC] if self.cache.quantized else None, [request.max_len])
        logits_1V = self.model(torch.tensor([chunk], device=self.model.device), kv_cache=batch, logits_to_keep=1)[:, -1]
        request.num_computed += len(chunk)
        self._name_full_blocks(request)
        if request.num_computed == len(request.tokens):
            self._accept([request], logits_1V)

    def _decode(self, requests: list[_Request]) -> None:
        for request in list(requests):  # every row needs a slot for the token it feeds
            if request in self._running:
                self._ensure_blocks(request, request.num_computed + 1)
        requests = [r for r in requests if r in self._running]  # some may have been preempted
        if not requests:
            return
        key_scales = [r.key_scale_LKC for r in requests] if self.cache.quantized else None
        batch = self.cache.batch([r.table for r in requests], [r.num_computed for r in requests], 1, key_scales,
                                 [r.max_len for r in requests])
        ids_B1 = torch.tensor([[r.tokens[-1]] for r in requests], device=self.model.device)
        logits_BV = self.model(ids_B1, kv_cache=batch)[:, -1]
        for request in requests:
            request.num_computed += 1
            self._name_full_blocks(request)
        self._accept(requests, logits_BV)

    def _preempt(self, request: _Request) -> None:
        """Free a running request's blocks and queue it first, to be recomputed later."""
        log.info("preempting request %d (KV cache full)", request.id)
        self.preemptions += 1
        self._running.remove(request)
        self.pool.release(request.table)
        request.table, request.block_hashes, request.num_computed = [], [], 0
        with self._lock:
            self._waiting.appendleft(request)

    def _name_full_blocks(self, request: _Request) -> None:
        if not self.config.prefix_caching:
            return
        P = self.cache.block_size
        while len(request.block_hashes) < request.num_computed // P:
            i = len(request.block_hashes)
            parent = request.block_hashes[-1] if request.block_hashes else (request.cache_namespace or None)
            request.block_hashes.append(BlockPool.block_hash(parent, request.tokens[i * P:(i + 1) * P]))
            self.pool.register(request.table[i], request.block_hashes[-1])

    def _accept(self, requests: list[_Request], logits_BV: torch.Tensor) -> None:
        """Sample each row's next token, stream its text, finish what is done."""
        num_valid = self.tokenizer.vocab_size
        if num_valid < logits_BV.shape[-1]:  # padding rows of the embedding are never sampled
            logits_BV[:, num_valid:] = -float("inf")
        tokens = self._sample(requests, logits_BV.float())  # float: argmax over bf16 is 3x slower
        for request, token in zip(requests, tokens):
            if token in request.stop_ids:
                self._finish(request, "stop")
                continue
            request.tokens.append(token)
            if request.seen_V is not None:
                request.seen_V[token] = True
            text = request.assembler.push(token)
            if request.assembler.stopped:
                self._finish(request, "stop", last_text=text, last_ids=[token])
            elif len(request.tokens) >= request.max_len:
                self._finish(request, "length", last_text=text, last_ids=[token])
            else:
                request.handle._put(Output(text, [token], request.prompt_len, request.num_generated))

    def _sample(self, requests: list[_Request], logits_BV: torch.Tensor) -> list[int]:
        greedy_rows = [i for i, r in enumerate(requests) if r.params.greedy and r.seen_V is None]
        tokens: list[int] = [0] * len(requests)
        if greedy_rows:
            best = logits_BV[greedy_rows].argmax(-1).tolist()
            for i, token in zip(greedy_rows, best):
                tokens[i] = token
        for i, request in enumerate(requests):
            if i not in greedy_rows:
                seen = request.seen_V[None] if request.seen_V is not None else None
                tokens[i] = int(sample_next_token(logits_BV[i:i + 1], request.params, seen_BV=seen,
                                                  generator=request.generator))
        return tokens

    def _finish(self, request: _Request, reason: str, *, last_text: str = "", last_ids: list[int] | None = None,
                error: str | None = None) -> None:
        if request in self._running:
            self._running.remove(request)
        self.pool.release(request.table)
        request.table = []
        self.cache.return_memory()
        text = last_text + (request.assembler.finish() if reason != "error" else "")
        request.handle._put(Output(text, last_ids or [], request.prompt_len, request.num_generated,
                                   finish_reason=reason, error=error))

    def _trim_idle_cache(self) -> None:
        """Idle: keep at most idle_cache_tokens of cached prefixes, return the rest to the OS."""
        keep = self.config.idle_cache_tokens // self.cache.block_size
        self.pool.evict_cached(keep=keep)
        self.cache.return_memory()
        return_freed_memory()  # activations of the last batch: back to the OS, not kept in the heap
