"""The OpenAI-compatible HTTP API over the batching engine (FastAPI; run by `qwen2 serve`).

Routes: POST /v1/chat/completions, POST /v1/completions (both streaming as server-sent events or
not), GET /v1/models, GET /health. Every error is OpenAI's error object with a 4xx status (5xx only
for a failure of the server itself): malformed JSON, wrong field types, prompts beyond the context,
max_tokens past it, a full queue (429), a bad API key (401). A client that disconnects cancels its
requests, and the engine frees their cache blocks before its next step.

Request bodies are read with a size cap before parsing, and prompts are tokenized in a worker
thread, so one huge or pathological request cannot stall the event loop for the others.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import secrets
import time
from dataclasses import dataclass
from typing import Any, AsyncIterator, Callable

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ValidationError

from qwen2.checkpoint.loader import Pretrained
from qwen2.inference.engine import Engine, EngineClosedError, Output, QueueFullError, RequestHandle
from qwen2.inference.generate import ContextLengthError
from qwen2.inference.sampling import SamplingParams
from qwen2.serve.protocol import APIError, ChatCompletionRequest, CompletionRequest, validation_message
from qwen2.serve.tools import ToolCallStream, split_tool_calls
from qwen2.tokenizer import encode_chat
from qwen2.tokenizer.template import ChatTemplateError

MAX_BODY_BYTES = 8 * 1024 * 1024
log = logging.getLogger(__name__)


@dataclass
class ServerConfig:
    model_name: str
    api_key: str | None = None
    max_body_bytes: int = MAX_BODY_BYTES


@dataclass
class _Prepared:
    """One request, ready to submit: prompts (token ids), how many choices each, sampling params."""

    prompts: list[list[int]]
    params: SamplingParams
    n: int


def create_app(pretrained: Pretrained, engine: Engine, config: ServerConfig) -> FastAPI:
    app = FastAPI(title="qwen2", docs_url=None, redoc_url=None, openapi_url=None)
    tokenizer = pretrained.tokenizer
    context = pretrained.model.config.max_position_embeddings
    created = int(time.time())

    @app.exception_handler(APIError)
    async def _api_error(request: Request, error: APIError) -> JSONResponse:
        headers = {"Retry-After": "1"} if error.status in (429, 503) else None
        return JSONResponse(error.body(), status_code=error.status, headers=headers)

    @app.exception_handler(Exception)
    async def _internal(request: Request, error: Exception) -> JSONResponse:
        log.exception("request %s %s failed", request.method, request.url.path)
        return JSONResponse(APIError(500, f"internal error ({type(error).__name__})", type="server_error").body(),
                            status_code=500)

    @app.exception_handler(404)
    async def _not_found(request: Request, error: Exception) -> JSONResponse:
        return JSONResponse(APIError(404, f"no route {request.method} {request.url.path}").body(), status_code=404)

    @app.exception_handler(405)
    async def _wrong_method(request: Request, error: Exception) -> JSONResponse:
        return JSONResponse(APIError(405, f"method {request.method} not allowed on {request.url.path}").body(),
                            status_code=405)

    def authorize(request: Request) -> None:
        if config.api_key is None:
            return
        given = request.headers.get("authorization", "")
        scheme, _, token = given.partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(token.strip().encode(), config.api_key.encode()):
            raise APIError(401, "invalid or missing API key (send 'Authorization: Bearer KEY')",
                           code="invalid_api_key")

    async def parse(request: Request, schema: type[BaseModel]) -> Any:
        authorize(request)
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > config.max_body_bytes:
            raise APIError(413, f"request body of {declared} bytes exceeds the limit of {config.max_body_bytes}")
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > config.max_body_bytes:
                raise APIError(413, f"request body exceeds the limit of {config.max_body_bytes} bytes")
        try:
            data = json.loads(bytes(body))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise APIError(400, f"the body is not valid JSON: {e}") from None
        if not isinstance(data, dict):
            raise APIError(400, f"the body must be a JSON object, not {type(data).__name__}")
        try:
            return schema.model_validate(data)
        except ValidationError as e:
            message, param = validation_message(e.errors())
            raise APIError(400, message, param=param) from None

    def sampling(req: ChatCompletionRequest | CompletionRequest, prompt_len: int) -> SamplingParams:
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(req, name):
                raise APIError(400, f"{name} is not supported (use repetition_penalty)", param=name)
        if req.logprobs:
            raise APIError(400, "logprobs are not supported", param="logprobs")
        if prompt_len >= context:
            raise APIError(400, f"the prompt has {prompt_len} tokens; this model's maximum context length is "
                                f"{context} tokens", param="messages", code="context_length_exceeded")
        limit = req.token_limit
        if limit is not None and prompt_len + limit > context:
            raise APIError(400, f"this model's maximum context length is {context} tokens; the request asks for "
                                f"{prompt_len} prompt tokens + {limit} completion tokens", param="max_tokens",
                           code="context_length_exceeded")
        try:
            return SamplingParams.from_generation_config(
                pretrained.generation_config, temperature=req.temperature, top_p=req.top_p,
                top_k=0 if req.top_k == -1 else req.top_k, min_p=req.min_p,
                repetition_penalty=req.repetition_penalty, seed=req.seed, stop=tuple(req.stop or ()),
                max_new_tokens=limit if limit is not None else context - prompt_len)
        except ValueError as e:
            raise APIError(400, str(e)) from None

    async def chat_prompt(req: ChatCompletionRequest) -> _Prepared:
        if req.chat_template is not None:
            raise APIError(400, "a request may not supply its own chat template", param="chat_template")
        messages = [m.to_template() for m in req.messages]
        try:
            ids = await asyncio.to_thread(encode_chat, tokenizer, messages, add_generation_prompt=True,
                                          tools=req.tools if req.calls_tools else None)
        except (ChatTemplateError, ValueError) as e:
            raise APIError(400, f"messages: {e}", param="messages") from None
        return _Prepared([ids], sampling(req, len(ids)), req.n)

    async def completion_prompts(req: CompletionRequest) -> _Prepared:
        prompt = req.prompt
        if isinstance(prompt, str):
            texts: list[Any] = [prompt]
        elif all(isinstance(p, int) for p in prompt):
            texts = [prompt]
        else:
            texts = list(prompt)
        if len(texts) * req.n > engine.config.max_queue:
            raise APIError(400, f"{len(texts)} prompts x n={req.n} exceeds the server's queue of "
                                f"{engine.config.max_queue}", param="prompt")
        prompts: list[list[int]] = []
        for p in texts:
            if isinstance(p, str):
                prompts.append(await asyncio.to_thread(tokenizer.encode, p))
            else:
                if any(not 0 <= t < tokenizer.vocab_size for t in p):
                    raise APIError(400, f"prompt token ids must be in [0, {tokenizer.vocab_size})", param="prompt")
                prompts.append(list(p))
        if any(not p for p in prompts):
            raise APIError(400, "the prompt is empty", param="prompt")
        # every prompt gets the same parameters, checked against the longest one
        return _Prepared(prompts, sampling(req, max(len(p) for p in prompts)), req.n)

    def submit(prepared: _Prepared) -> list[RequestHandle]:
        loop = asyncio.get_running_loop()
        handles: list[RequestHandle] = []
        try:
            for prompt in prepared.prompts:
                for i in range(prepared.n):
                    params = prepared.params
                    if params.seed is not None and i:  # n choices from one seed must still differ
                        params = dataclasses.replace(params, seed=params.seed + i)
                    handles.append(engine.submit(prompt, params, loop=loop))
        except QueueFullError as e:
            _cancel(handles)
            raise APIError(429, f"the server is busy ({e}); retry later", type="rate_limit_error",
                           code="queue_full") from None
        except EngineClosedError:
            _cancel(handles)
            raise APIError(503, "the server is shutting down", type="server_error") from None
        except ContextLengthError as e:
            _cancel(handles)
            raise APIError(400, str(e), code="context_length_exceeded") from None
        return handles

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "model": config.model_name, **engine.stats()}

    @app.get("/v1/models")
    async def models(request: Request) -> dict:
        authorize(request)
        return {"object": "list", "data": [{"id": config.model_name, "object": "model", "created": created,
                                            "owned_by": "qwen2", "max_model_len": context}]}

    async def respond(request: Request, req: ChatCompletionRequest | CompletionRequest, prepared: _Prepared, *,
                      kind: str, chunk: Callable[[dict, int, Output | None], dict | None],
                      choice: Callable[[int, str, Output], dict]) -> Any:
        """Submit, then stream (SSE) or wait for the whole answer; `chunk` and `choice` shape the events
        and the final choices of this endpoint."""
        handles = submit(prepared)
        now = int(time.time())
        head = {"id": f"{'chatcmpl' if kind == 'chat.completion' else 'cmpl'}-{secrets.token_hex(12)}",
                "object": f"{kind}.chunk" if kind == "chat.completion" else kind, "created": now,
                "model": config.model_name}
        prompt_tokens = sum(len(p) for p in prepared.prompts)
        if req.stream:
            return _sse(handles, lambda index, out: chunk(head, index, out), head, prompt_tokens, req.include_usage)
        outputs = await _collect(request, handles)
        return {**head, "object": kind, "choices": [choice(i, text, last) for i, (text, last) in enumerate(outputs)],
                "usage": _usage(prompt_tokens, outputs)}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Any:
        req: ChatCompletionRequest = await parse(request, ChatCompletionRequest)
        prepared = await chat_prompt(req)

        # With tools, the text of each choice goes through a ToolCallStream: call blocks are held back
        # and sent as `tool_calls` at the end (finish_reason "tool_calls").
        tool_names = req.tool_names
        streams = [ToolCallStream(tool_names) if req.calls_tools else None
                   for _ in range(len(prepared.prompts) * req.n)]

        def chunk(head: dict, index: int, out: Output | None) -> dict:
            if out is None:  # the first event of a choice names the role
                return {**head, "choices": [{"index": index, "delta": {"role": "assistant", "content": ""},
                                             "logprobs": None, "finish_reason": None}]}
            stream, calls = streams[index], []
            text = out.text if stream is None else stream.feed(out.text)
            if stream is not None and out.finished:
                rest, calls = stream.finish()
                text += rest
            delta: dict = {"content": text} if text else {}
            if calls:
                delta["tool_calls"] = [{"index": i, **call} for i, call in enumerate(calls)]
            return {**head, "choices": [{"index": index, "delta": delta, "logprobs": None,
                                         "finish_reason": _finish_reason(out.finish_reason, calls)}]}

        def choice(index: int, text: str, last: Output) -> dict:
            content, calls = split_tool_calls(text, tool_names) if req.calls_tools else (text, [])
            message: dict = {"role": "assistant", "content": content}
            if calls:
                message["tool_calls"] = calls
            return {"index": index, "message": message, "logprobs": None,
                    "finish_reason": _finish_reason(last.finish_reason, calls)}

        return await respond(request, req, prepared, kind="chat.completion", chunk=chunk, choice=choice)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Any:
        req: CompletionRequest = await parse(request, CompletionRequest)
        prepared = await completion_prompts(req)
        echo = [tokenizer.decode(p) if req.echo else "" for p in prepared.prompts]

        def chunk(head: dict, index: int, out: Output | None) -> dict | None:
            text = out.text if out is not None else echo[index // prepared.n]  # echo opens the stream
            if out is None and not text:
                return None
            return {**head, "choices": [{"index": index, "text": text, "logprobs": None,
                                         "finish_reason": out.finish_reason if out else None}]}

        def choice(index: int, text: str, last: Output) -> dict:
            return {"index": index, "text": echo[index // prepared.n] + text, "logprobs": None,
                    "finish_reason": last.finish_reason}

        return await respond(request, req, prepared, kind="text_completion", chunk=chunk, choice=choice)

    app.state.engine = engine
    return app


def _finish_reason(reason: str | None, calls: list[dict]) -> str | None:
    return "tool_calls" if calls and reason == "stop" else reason


def _cancel(handles: list[RequestHandle]) -> None:
    for handle in handles:
        handle.cancel()


def _usage(prompt_tokens: int, outputs: list[tuple[str, Output]]) -> dict[str, int]:
    completion = sum(last.completion_tokens for _, last in outputs)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion, "total_tokens": prompt_tokens + completion}


async def _merge(handles: list[RequestHandle]) -> AsyncIterator[tuple[int, Output]]:
    """Events of several requests as they come, tagged with the request's index."""
    if len(handles) == 1:
        async for out in handles[0]:
            yield 0, out
        return
    merged: asyncio.Queue[tuple[int, Output]] = asyncio.Queue()

    async def pump(index: int, handle: RequestHandle) -> None:
        async for out in handle:
            await merged.put((index, out))

    tasks = [asyncio.create_task(pump(i, h)) for i, h in enumerate(handles)]
    try:
        for _ in handles:
            while True:
                index, out = await merged.get()
                yield index, out
                if out.finished:
                    break
    finally:
        for task in tasks:
            task.cancel()


def _raise_if_failed(out: Output) -> None:
    if out.finish_reason == "error":
        raise APIError(500, f"generation failed: {out.error}", type="server_error")
    if out.finish_reason == "cancelled":
        raise APIError(503, "the request was cancelled (server shutting down)", type="server_error")


async def _collect(request: Request, handles: list[RequestHandle]) -> list[tuple[str, Output]]:
    """Wait for every request to finish; cancel them all if the client goes away first."""
    texts: list[list[str]] = [[] for _ in handles]
    finals: list[Output | None] = [None] * len(handles)

    async def gather() -> None:
        async for index, out in _merge(handles):
            texts[index].append(out.text)
            if out.finished:
                finals[index] = out

    async def watch_disconnect() -> None:
        while not await request.is_disconnected():
            await asyncio.sleep(0.25)

    work, watch = asyncio.create_task(gather()), asyncio.create_task(watch_disconnect())
    try:
        done, _ = await asyncio.wait({work, watch}, return_when=asyncio.FIRST_COMPLETED)
        if work not in done:  # the client left: nobody will read the answer
            _cancel(handles)
            raise asyncio.CancelledError
        work.result()
    finally:
        watch.cancel()
        if not work.done():
            work.cancel()
            _cancel(handles)
    for out in finals:
        _raise_if_failed(out)
    return [("".join(t), out) for t, out in zip(texts, finals)]


def _sse(handles: list[RequestHandle], chunk: Callable[[int, Output | None], dict | None],
         head: dict, prompt_tokens: int, include_usage: bool) -> StreamingResponse:
    async def events() -> AsyncIterator[str]:
        completion_tokens = 0
        try:
            for index in range(len(handles)):
                first = chunk(index, None)
                if first is not None:
                    yield _event(first)
            async for index, out in _merge(handles):
                if out.finish_reason in ("error", "cancelled"):
                    error = APIError(500 if out.finish_reason == "error" else 503,
                                     out.error or "the request was cancelled", type="server_error")
                    yield _event(error.body())
                    break
                if out.finished:
                    completion_tokens += out.completion_tokens
                if out.text or out.finished:
                    yield _event(chunk(index, out))
            if include_usage:
                yield _event({**head, "choices": [], "usage": {
                    "prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                    "total_tokens": prompt_tokens + completion_tokens}})
            yield "data: [DONE]\n\n"
        finally:  # normal end, or the client went away (Starlette cancels this generator)
            _cancel(handles)

    return StreamingResponse(events(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def _event(data: dict) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"
