"""`kvstore serve`'s HTTP API: OpenAI's completions and chat completions (streamed over
server-sent events or not), the model list, health and Prometheus metrics, on FastAPI.

    POST /v1/completions        prompt (text or token ids), max_tokens (16), temperature (1),
                                top_p (1), seed, stop, n=1, stream, stream_options, and
                                vLLM's ignore_eos
    POST /v1/chat/completions   messages (the model's chat template), max_tokens or
                                max_completion_tokens (default: what the context leaves), ...
    GET  /v1/models             the one model served
    GET  /health                200 while every engine runs, else 503 (one restarts); each
                                engine's state, process id and restarts
    GET  /metrics               Prometheus (`engines.serving.metrics`)

A bad request (unknown model, a malformed or out-of-range field, a prompt longer than the
context) is answered with OpenAI's error shape, ``{"error": {"message", "type", "param",
"code"}}``, and a 4xx status, and starts nothing. A client that disconnects, streaming or
not, has its request cancelled on its engine.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import uuid
from collections.abc import AsyncIterator
from typing import Any, Literal

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict

from engines.processes import EngineDiedError
from engines.serving.backend import Backend, Delta, ServingError

log = logging.getLogger(__name__)

DISCONNECT_POLL_S = 0.25  # how often a non-streamed request checks its client is there


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore")  # (fields of OpenAI's API not used here)

    model: str
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: str | list[str] | None = None
    n: int = 1
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    ignore_eos: bool = False  # (vLLM's extension: generate max_tokens whatever comes)


class CompletionRequest(_Request):
    prompt: str | list[int] | list[str] | list[list[int]]
    max_tokens: int | None = 16
    echo: bool = False
    logprobs: int | None = None
    best_of: int | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: str
    content: str | list[dict[str, Any]] | None = None


class ChatRequest(_Request):
    messages: list[ChatMessage]
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    logprobs: bool = False
    tools: list[Any] | None = None


def create_app(backend: Backend, *, api_key: str | None = None) -> FastAPI:
    """The app; with ``api_key``, the /v1 routes answer 401 unless the request says
    ``Authorization: Bearer API_KEY`` (health and metrics stay open, for load balancers
    and scrapers)."""
    expected = f"Bearer {api_key}".encode() if api_key else None

    async def authorized(request: Request) -> None:
        given = request.headers.get("authorization", "").encode()
        if expected is not None and not hmac.compare_digest(given, expected):
            raise ServingError("Incorrect API key provided.", status=401,
                               code="invalid_api_key")

    app = FastAPI(title="kvstore serve", docs_url=None, redoc_url=None)
    v1 = {"dependencies": [Depends(authorized)]}

    @app.exception_handler(ServingError)
    async def serving_error(_: Request, error: ServingError) -> JSONResponse:
        return _error(error)

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, error: RequestValidationError) -> JSONResponse:
        first = error.errors()[0] if error.errors() else {}
        where = [str(p) for p in first.get("loc", ()) if p != "body"]
        message = first.get("msg", "invalid request")
        if first.get("type") == "json_invalid":
            message, where = "the request body is not valid JSON", []
        elif where:
            message = f"{'.'.join(where)}: {message}"
        return _error(ServingError(message, param=".".join(where) or None))

    @app.exception_handler(Exception)
    async def failed(_: Request, error: Exception) -> JSONResponse:
        log.exception("request failed", exc_info=error)
        return _error(ServingError(f"the engine failed: {error}", status=500,
                                   type="InternalServerError"))

    @app.get("/health")
    async def health() -> Response:
        ok = backend.healthy()
        return JSONResponse({"status": "ok" if ok else "unhealthy",
                             "engines": backend.engines()}, status_code=200 if ok else 503)

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(backend.metrics.exposition(),
                        media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/v1/models", **v1)
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{
            "id": backend.model_name, "object": "model", "created": backend.created,
            "owned_by": "kvstore", "max_model_len": backend.max_model_len}]}

    @app.post("/v1/completions", **v1)
    async def completions(body: CompletionRequest, request: Request) -> Response:
        _check_common(backend, body)
        if body.echo or body.logprobs is not None or (body.best_of or 1) != 1:
            raise ServingError("echo, logprobs and best_of are not supported",
                               param="logprobs" if body.logprobs is not None else "echo")
        prompt = body.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], str | list):
            if len(prompt) != 1:
                raise ServingError("one prompt per request is supported", param="prompt")
            prompt = prompt[0]
        ids = backend.encode(prompt)  # type: ignore[arg-type]
        return await _serve(backend, request, body, ids, body.max_tokens, "text_completion",
                            prompt_param="prompt")

    @app.post("/v1/chat/completions", **v1)
    async def chat(body: ChatRequest, request: Request) -> Response:
        _check_common(backend, body)
        if body.logprobs or body.tools:
            raise ServingError("logprobs and tools are not supported",
                               param="tools" if body.tools else "logprobs")
        if not body.messages:
            raise ServingError("messages must not be empty", param="messages")
        messages = [{"role": m.role, "content": _text_of(m, i)}
                    for i, m in enumerate(body.messages)]
        ids = backend.chat(messages)
        max_tokens = (body.max_completion_tokens if body.max_completion_tokens is not None
                      else body.max_tokens)
        return await _serve(backend, request, body, ids, max_tokens, "chat.completion",
                            prompt_param="messages")

    return app


def _check_common(backend: Backend, body: _Request) -> None:
    if body.model != backend.model_name:
        raise ServingError(f"The model `{body.model}` does not exist.", status=404,
                           type="NotFoundError", param="model", code="model_not_found")
    if body.n != 1:
        raise ServingError("n must be 1 here", param="n")
    if not 0 <= body.temperature <= 2:
        raise ServingError(f"temperature must be in [0, 2], got {body.temperature}",
                           param="temperature")
    if not 0 < body.top_p <= 1:
        raise ServingError(f"top_p must be in (0, 1], got {body.top_p}", param="top_p")
    if body.presence_penalty or body.frequency_penalty:
        raise ServingError("presence and frequency penalties are not supported",
                           param="presence_penalty")
    for name in ("max_tokens", "max_completion_tokens"):
        value = getattr(body, name, None)
        if value is not None and value < 1:
            raise ServingError(f"{name} must be at least 1, got {value}", param=name)


def _text_of(message: ChatMessage, index: int) -> str:
    content = message.content
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    texts = []
    for part in content:
        if part.get("type") != "text" or not isinstance(part.get("text"), str):
            raise ServingError(f"messages.{index}.content: only text parts are supported",
                               param=f"messages.{index}.content")
        texts.append(part["text"])
    return "".join(texts)


async def _serve(backend: Backend, request: Request, body: Any, ids: list[int],
                 max_tokens: int | None, kind: Literal["text_completion", "chat.completion"],
                 *, prompt_param: str) -> Response:
    sampling = backend.sampling(ids, max_tokens=max_tokens, temperature=body.temperature,
                                top_p=body.top_p, seed=body.seed, prompt_param=prompt_param,
                                ignore_eos=body.ignore_eos)
    stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    request_id = f"{'cmpl' if kind == 'text_completion' else 'chatcmpl'}-{uuid.uuid4().hex}"
    deltas = backend.generate(ids, sampling, stop, request_id=request_id)
    shape = _Shape(backend, request_id, kind, len(ids))
    if body.stream:
        usage = bool((body.stream_options or {}).get("include_usage"))
        return StreamingResponse(_events(deltas, shape, usage), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})
    return JSONResponse(await _whole(deltas, shape, request))


async def _whole(deltas: AsyncIterator[Delta], shape: _Shape, request: Request
                 ) -> dict[str, Any]:
    """The whole reply; the request is cancelled if its client goes away meanwhile."""
    async def collect() -> tuple[str, list[int], Delta]:
        parts: list[str] = []
        ids: list[int] = []
        async with contextlib.aclosing(deltas) as stream:  # (closing it cancels the request)
            async for delta in stream:
                parts.append(delta.text)
                ids.extend(delta.token_ids)
                if delta.finish_reason is not None:
                    return "".join(parts), ids, delta
        raise RuntimeError("the request ended without a finish reason")

    task = asyncio.ensure_future(collect())
    while True:
        done, _ = await asyncio.wait({task}, timeout=DISCONNECT_POLL_S)
        if done:
            break
        if await request.is_disconnected():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            return {}
    text, ids, last = task.result()
    return shape.whole(text, last, ids)


async def _events(deltas: AsyncIterator[Delta], shape: _Shape, usage: bool
                  ) -> AsyncIterator[str]:
    """Server-sent events: OpenAI's chunks, then ``[DONE]``. A client that goes away
    closes this generator, which closes ``deltas`` (and cancels the request)."""
    async with contextlib.aclosing(deltas) as stream:
        first = True
        try:
            async for delta in stream:
                if first and shape.kind == "chat.completion":
                    yield _sse(shape.chunk({"role": "assistant", "content": ""}, None))
                first = False
                if delta.text or (delta.token_ids and shape.with_ids):
                    yield _sse(shape.chunk(delta.text, None, delta.token_ids))
                if delta.finish_reason is not None:
                    yield _sse(shape.chunk("", delta.finish_reason))
                    if usage:
                        yield _sse(shape.usage_chunk(delta.completion_tokens))
        except ServingError as e:
            yield _sse({"error": _error_body(e)})
        except Exception as e:  # an engine failed mid-stream: say so in the stream
            if isinstance(e, EngineDiedError):  # (its process's death is logged already)
                log.warning("request %s failed: %s", shape.request_id, e)
            else:
                log.exception("request %s failed", shape.request_id)
            yield _sse({"error": _error_body(ServingError(
                f"the engine failed: {e}", status=500, type="InternalServerError"))})
    yield "data: [DONE]\n\n"


class _Shape:
    """OpenAI's response objects for one request."""

    def __init__(self, backend: Backend, request_id: str, kind: str, prompt_tokens: int
                 ) -> None:
        self.backend, self.request_id, self.kind = backend, request_id, kind
        self.prompt_tokens = prompt_tokens
        # No tokenizer: each choice carries its token ids (vLLM's token_ids field).
        self.with_ids = backend.tokenizer is None

    def _head(self, object_type: str) -> dict[str, Any]:
        return {"id": self.request_id, "object": object_type,
                "created": self.backend.created, "model": self.backend.model_name}

    def _usage(self, completion_tokens: int) -> dict[str, int]:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": completion_tokens,
                "total_tokens": self.prompt_tokens + completion_tokens}

    def whole(self, text: str, last: Delta, ids: list[int]) -> dict[str, Any]:
        choice: dict[str, Any] = {"index": 0, "logprobs": None,
                                  "finish_reason": last.finish_reason}
        if self.with_ids:
            choice["token_ids"] = ids
        if self.kind == "chat.completion":
            choice["message"] = {"role": "assistant", "content": text}
        else:
            choice["text"] = text
        return {**self._head(self.kind), "choices": [choice],
                "usage": self._usage(last.completion_tokens)}

    def chunk(self, content: str | dict[str, str], finish_reason: str | None,
              ids: tuple[int, ...] = ()) -> dict[str, Any]:
        choice: dict[str, Any] = {"index": 0, "logprobs": None,
                                  "finish_reason": finish_reason}
        if self.with_ids:
            choice["token_ids"] = list(ids)
        if self.kind == "chat.completion":
            choice["delta"] = content if isinstance(content, dict) else (
                {"content": content} if content else {})
            return {**self._head("chat.completion.chunk"), "choices": [choice]}
        choice["text"] = content
        return {**self._head("text_completion"), "choices": [choice]}

    def usage_chunk(self, completion_tokens: int) -> dict[str, Any]:
        kind = "chat.completion.chunk" if self.kind == "chat.completion" else self.kind
        return {**self._head(kind), "choices": [], "usage": self._usage(completion_tokens)}


def _sse(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


def _error_body(error: ServingError) -> dict[str, Any]:
    return {"message": str(error), "type": error.type, "param": error.param,
            "code": error.code}


def _error(error: ServingError) -> JSONResponse:
    return JSONResponse({"error": _error_body(error)}, status_code=error.status)
