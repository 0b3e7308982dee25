"""The OpenAI-compatible app: `create_app(engine, ServerConfig(...))` -> FastAPI, served by uvicorn or Ray Serve.

/v1/completions and /v1/chat/completions (SSE with stream=true), /v1/models, /health and /metrics. Requests from every
client are batched continuously by the runtime's async pool (engine.serving(), opened in the lifespan). Bad input is
refused before any compute, in OpenAI's error shape; a client that leaves frees its rows; a request that fails
answers 500 (or an error event mid-stream) and the server keeps serving.
"""

from __future__ import annotations

import asyncio
import hmac
import itertools
import json
import logging
import math
import os
import socket
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect

from ..errors import GptxError, InvalidInput, QueueFull
from ..scheduler import DEFAULT_PREFILL_CHUNK, DEFAULT_PREFIX_CACHE_MB, max_group
from ..serving import Event, RequestStream
from .chat import ChatTemplate
from .logprobs import best, chat_logprobs, completion_logprobs
from .metrics import Metrics
from .schemas import (MAX_IGNORED_NAMED, MAX_STOP, UNSUPPORTED, ChatCompletionRequest, CompletionRequest,
                      GenerationFields, StreamOptions, error_body)

log = logging.getLogger("gptx.server")

COMPLETIONS_DEFAULT_MAX_TOKENS = 16     # OpenAI's default for /v1/completions; chat defaults to the context
ROUTES = ("/v1/completions", "/v1/chat/completions", "/v1/models", "/health", "/metrics")
OFF_LOOP_PROMPT_BYTES = 16 * 1024  # longer prompt texts are tokenized in a worker thread (tiktoken drops the GIL)


@dataclass(frozen=True)
class ServerConfig:
    model_name: str
    max_batch: int = 8
    max_queue: int = 64
    max_tokens_limit: int | None = None   # the most new tokens one request may ask for (None: up to the context)
    prefill_chunk: int = DEFAULT_PREFILL_CHUNK        # prompt tokens computed per scheduler step
    prefix_cache_mb: float = DEFAULT_PREFIX_CACHE_MB  # memory for reusing computed prompt prefixes
    api_key: str | None = None            # requests to /v1/* need `Authorization: Bearer <key>`
    max_body_bytes: int = 1 << 20
    chat_template: ChatTemplate = field(default_factory=ChatTemplate)
    replica: str | None = None            # the x-gptx-replica header (default host:pid)
    retry_after_seconds: int = 1
    max_headers: int = 100                # more request headers get 431, before authentication


class APIError(Exception):
    """An answer with OpenAI's error body, raised anywhere before a response starts."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.body, self.headers = status, error_body(message, type, param, code), headers

    def response(self) -> JSONResponse:
        return JSONResponse(self.body, self.status, headers=self.headers)


def as_api_error(e: Exception, record: RequestRecord, retry_after: int) -> APIError:
    """Any exception as the answer the client gets: ours map to their status, anything else is a bug (500; Starlette
    logs its traceback)."""
    if isinstance(e, APIError):
        return e
    if isinstance(e, HTTPException):
        return APIError(e.status_code, str(e.detail), code={404: "not_found", 413: "body_too_large"}.get(e.status_code),
                        headers=e.headers)
    if isinstance(e, InvalidInput):
        return APIError(400, str(e))
    if isinstance(e, QueueFull):
        return APIError(429, str(e), "rate_limit_error", code="queue_full", headers={"Retry-After": str(retry_after)})
    if isinstance(e, GptxError):  # a failed generation, e.g. non-finite logits
        log.error("%s failed: %s", record.id, e)
        return APIError(500, str(e), "server_error")
    return APIError(500, f"internal error ({type(e).__name__}); see the server log", "server_error")


@dataclass
class RequestRecord:
    """What the log line and the metrics say about one HTTP request."""
    id: str = field(default_factory=lambda: uuid.uuid4().hex[:24])
    started: float = field(default_factory=time.perf_counter)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    finish: str = ""
    ttft: float | None = None
    ignored: list[str] = field(default_factory=list)   # unknown fields ignored (the x-gptx-ignored-fields header)


class Frontdoor:
    """Pure ASGI middleware (it must not buffer SSE): the API key on /v1/*, the body size limit (ours: FastAPI's
    answers in plain text, uvicorn has none), the replica and request-id headers, the metrics and the log line."""

    def __init__(self, app, *, config: ServerConfig, metrics: Metrics):
        self.app, self.config, self.metrics = app, config, metrics
        self.replica = (config.replica or f"{socket.gethostname()}:{os.getpid()}").encode("latin-1", "replace")
        self.too_large = f"the request body is over this server's limit of {config.max_body_bytes} bytes"

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        record = scope["gptx.record"] = RequestRecord()
        status = 500

        async def send_with_headers(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                extra = [(b"x-gptx-replica", self.replica), (b"x-request-id", record.id.encode())]
                if record.ignored:
                    extra.append((b"x-gptx-ignored-fields", ", ".join(record.ignored).encode()))
                message = {**message, "headers": [*message.get("headers", ()), *extra]}
            await send(message)

        received = 0

        async def receive_within_limit():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.config.max_body_bytes:  # a chunked body (no Content-Length) that goes on too long
                    raise HTTPException(413, self.too_large)
            return message

        try:
            self.admit(scope)
            await self.app(scope, receive_within_limit, send_with_headers)
        except APIError as e:  # admit's refusal (the app answers its own)
            await e.response()(scope, receive, send_with_headers)
        finally:
            endpoint = (scope["path"] if scope["path"] in ROUTES else
                        "/v1/models/{id}" if scope["path"].startswith("/v1/models/") else "other")
            seconds = time.perf_counter() - record.started
            self.metrics.http_requests.labels(endpoint, str(status)).inc()
            self.metrics.request_seconds.labels(endpoint).observe(seconds)
            if endpoint != "/metrics" and endpoint != "/health":
                path = endpoint if endpoint != "other" else ascii(scope["path"][:200])  # never a raw newline
                ttft = f" ttft={record.ttft:.3f}s" if record.ttft is not None else ""
                log.info("%s %s %s %d prompt_tokens=%d completion_tokens=%d%s%s %.3fs", record.id,
                         ascii(scope["method"])[1:-1], path, status, record.prompt_tokens, record.completion_tokens,
                         f" finish={record.finish}" if record.finish else "", ttft, seconds)

    def admit(self, scope) -> None:
        limit, key = self.config.max_headers, self.config.api_key
        if len(scope["headers"]) > limit:  # their total size is bounded by the HTTP server (edge.py)
            raise APIError(431, f"the request has {len(scope['headers'])} headers, over this server's limit of "
                                 f"{limit}", code="request_header_fields_too_large")
        headers = dict(scope["headers"])
        if key is not None and scope["path"].startswith("/v1/"):
            scheme, _, token = headers.get(b"authorization", b"").decode("latin-1").partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), key.encode()):
                raise APIError(401, "a valid API key is needed: send `Authorization: Bearer <key>`",
                                code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
        declared = headers.get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.config.max_body_bytes:
            raise APIError(413, self.too_large, code="body_too_large")


class Generation:
    """One HTTP request's pool streams (`samples` per prompt, sharing its prefill: stream k is prompt k // samples):
    queued together when made (so 400 / 429 come before any response), iterated as (choice index, Event) with
    per-token timing, cancelled together by `close()`."""

    def __init__(self, pool, prompts: list[list[int]], max_tokens: int, options: dict, stop: list[str],
                 record: RequestRecord, metrics: Metrics, live: set, samples: int = 1):
        self.record, self.metrics, self.live = record, metrics, live
        self.streams: list[RequestStream] = []
        try:
            for i, ids in enumerate(prompts):
                self.streams.extend(pool.samples(ids, samples, max_tokens=max_tokens, stop=stop,
                                                 request_id=f"{record.id}-{i}", group=record.id, **options))
        except BaseException:
            for stream in self.streams:
                stream.cancel()
            raise
        count = len(self.streams)
        self.tokens, self.finish, self._last_token = [0] * count, [None] * count, [None] * count
        record.prompt_tokens = sum(map(len, prompts))
        metrics.prompt_tokens.inc(record.prompt_tokens)
        live.add(self)  # what a SIGTERM drain waits for, until close()

    async def events(self) -> AsyncIterator[tuple[int, Event]]:
        source = ((0, e) async for e in self.streams[0]) if len(self.streams) == 1 else _merged(self.streams)
        async for i, event in source:
            if event.token_ids:
                now = time.perf_counter()
                if self._last_token[i] is None:
                    self.metrics.ttft.observe(now - self.record.started)
                    self.metrics.cached_prompt_tokens.inc(event.cached_tokens)
                    self.record.ttft = now - self.record.started if self.record.ttft is None else self.record.ttft
                else:
                    self.metrics.itl.observe(now - self._last_token[i])
                self._last_token[i] = now
                self.tokens[i] += len(event.token_ids)
                self.metrics.completion_tokens.inc(len(event.token_ids))
            if event.finish_reason is not None:
                self._finished(i, event.finish_reason)
                if event.finish_reason == "cancelled":  # only the pool's own shutdown cancels a live request
                    raise APIError(503, "the server is shutting down; retry", "server_error", code="shutting_down")
            yield i, event

    def close(self, error: BaseException | None = None) -> None:
        """Cancel what is still running and account for it: as failed after an error of the generation, as cancelled
        after none, a cancellation or an APIError (the client left: 499, the pool shut down: 503)."""
        for i, stream in enumerate(self.streams):
            if self.finish[i] is None:
                stream.cancel()
                self._finished(i, "error" if isinstance(error, Exception) and not isinstance(error, APIError) else
                               "cancelled")
        self.record.completion_tokens = sum(self.tokens)
        self.record.finish = ",".join(dict.fromkeys(r for r in self.finish if r))
        self.live.discard(self)

    def usage(self) -> dict:
        completion = sum(self.tokens)
        return {"prompt_tokens": self.record.prompt_tokens, "completion_tokens": completion,
                "total_tokens": self.record.prompt_tokens + completion}

    def _finished(self, i: int, reason: str) -> None:
        self.finish[i] = reason
        self.metrics.completions.labels(reason).inc()


async def _merged(streams: list[RequestStream]) -> AsyncIterator[tuple[int, Event]]:
    """Events of several streams in arrival order (one task per stream; the queue holds at most every event)."""
    inbox: asyncio.Queue = asyncio.Queue()

    async def pump(i: int, stream: RequestStream):
        try:
            async for event in stream:
                inbox.put_nowait((i, event))
            inbox.put_nowait((i, None))  # this stream has ended
        except Exception as e:  # handed to the consumer, which raises it with its traceback
            inbox.put_nowait((i, e))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        running = len(tasks)
        while running:
            i, item = await inbox.get()
            if isinstance(item, Exception):
                raise item
            if item is None:
                running -= 1
            else:
                yield i, item
    finally:
        for task in tasks:
            task.cancel()


@dataclass
class Sampled:
    """What one sample (stream) of a request produced, for the final body."""
    text: list[str] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)
    logprobs: list = field(default_factory=list)
    prompt_logprobs: list | None = None


class CompletionFormat:
    """/v1/completions bodies and chunks. `logprobs`: alternatives per token (None: no logprobs); `echo`: each
    prompt's (text, token ids), put before its choices' text; `n` of `samples` per prompt are returned (best_of)."""
    object, chunk_object, prefix = "text_completion", "text_completion", "cmpl-"

    def __init__(self, model: str, record: RequestRecord, tokenizer, logprobs: int | None = None, n: int = 1,
                 samples: int = 1, echo: list[tuple[str, list[int]]] | None = None):
        self.id, self.model, self.created = self.prefix + record.id, model, int(time.time())
        self.tokenizer, self.logprobs, self.echo, self.n, self.samples = tokenizer, logprobs, echo, n, samples
        self._offsets: dict[int, int] = {}  # streaming: the length of each choice's text so far

    def envelope(self, obj: str, choices: list, **extra) -> dict:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model, "choices": choices,
                **extra}

    def opening(self) -> list[dict]:
        return []

    def piece(self, i: int, text: str) -> str:
        return text

    def choice(self, i: int, text: str, finish_reason: str | None, logprobs: dict | None = None) -> dict:
        return {"index": i, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}

    def chunk_choice(self, i: int, text: str, finish_reason: str | None, event: Event | None = None) -> dict:
        logprobs = None
        if self.logprobs is not None and event is not None:
            offset = self._offsets.get(i, 0)
            logprobs = completion_logprobs(self.tokenizer, event.token_ids, event.logprobs, offset)
            self._offsets[i] = offset + sum(map(len, logprobs["tokens"]))
        return self.choice(i, text, finish_reason, logprobs)

    def choices(self, results: list[Sampled], finish: list[str | None]) -> list[dict]:
        """The body's choices: per prompt, its n best samples (all of them without best_of), echo and logprobs."""
        out = []
        for p in range(len(results) // self.samples):
            ks = range(p * self.samples, (p + 1) * self.samples)
            if self.samples > self.n:
                ks = [ks[0] + j for j in best([results[k].logprobs for k in ks], self.n)]
            for k in ks:
                r = results[k]
                prompt_text, prompt_ids = self.echo[p] if self.echo else ("", [])
                logprobs = None
                if self.logprobs is not None:
                    logprobs = completion_logprobs(self.tokenizer, r.tokens, r.logprobs, len(prompt_text))
                    if self.echo:  # the prompt's tokens first
                        echoed = completion_logprobs(self.tokenizer, prompt_ids, r.prompt_logprobs)
                        logprobs = {key: echoed[key] + logprobs[key] for key in logprobs}
                out.append(self.choice(len(out), prompt_text + "".join(r.text), finish[k], logprobs))
        return out


class ChatFormat(CompletionFormat):
    """/v1/chat/completions bodies and chunks; the reply's leading whitespace (after "Assistant:") is dropped."""
    object, chunk_object, prefix = "chat.completion", "chat.completion.chunk", "chatcmpl-"

    def opening(self) -> list[dict]:
        return [{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
                for i in range(self.samples)]

    def piece(self, i: int, text: str) -> str:
        if not self._offsets.get(i):
            text = text.lstrip()
        self._offsets[i] = self._offsets.get(i, 0) + len(text)
        return text

    def choice(self, i: int, text: str, finish_reason: str | None, logprobs: dict | None = None) -> dict:
        return {"index": i, "message": {"role": "assistant", "content": text}, "logprobs": logprobs,
                "finish_reason": finish_reason}

    def chunk_choice(self, i: int, text: str, finish_reason: str | None, event: Event | None = None) -> dict:
        logprobs = None
        if self.logprobs is not None and event is not None:
            logprobs = chat_logprobs(self.tokenizer, event.logprobs)
        return {"index": i, "delta": {"content": text} if text else {}, "logprobs": logprobs,
                "finish_reason": finish_reason}

    def choices(self, results: list[Sampled], finish: list[str | None]) -> list[dict]:
        return [self.choice(k, "".join(r.text), finish[k], None if self.logprobs is None else
                            chat_logprobs(self.tokenizer, r.logprobs)) for k, r in enumerate(results)]


def sse(payload: dict | str) -> str:
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload)}\n\n"


def create_app(engine, config: ServerConfig) -> FastAPI:
    metrics = Metrics(config.max_batch)
    state: dict = {"pool": None, "draining": False}
    live: set[Generation] = set()   # requests generating or still sending their response
    max_token_bytes = max(map(len, engine.tokenizer.ranks()))  # no token carries more text than this

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        async with engine.serving(max_batch=config.max_batch, max_queue=config.max_queue,
                                  prefill_chunk=config.prefill_chunk, prefix_cache_mb=config.prefix_cache_mb,
                                  on_step=metrics.on_step) as pool:
            state["pool"] = pool
            try:
                yield
            finally:
                state["pool"] = None

    app = FastAPI(title="gptx", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(Frontdoor, config=config, metrics=metrics)

    async def drain(timeout: float) -> None:
        """SIGTERM: /health and new requests answer 503 while the requests in flight run for up to `timeout`
        seconds; then the pool closes under what is left, whose streams end with the `shutting_down` error event
        and [DONE] (non-streaming ones get 503)."""
        state["draining"] = True
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while live and loop.time() < deadline:
            await asyncio.sleep(0.05)
        pool = state["pool"]
        if live and pool is not None:
            log.warning("%d request(s) still running after the shutdown timeout of %gs: ending them", len(live),
                        timeout)
            await pool.aclose()
            deadline = loop.time() + 5.0  # their last events are already queued: they go out at once
            while live and loop.time() < deadline:
                await asyncio.sleep(0.02)

    app.state.drain = drain

    async def refuse(request: Request, e: Exception) -> JSONResponse:  # every refusal and failure, in OpenAI's shape
        return as_api_error(e, request.scope["gptx.record"], config.retry_after_seconds).response()

    for kind in (APIError, HTTPException, InvalidInput, QueueFull, GptxError, Exception):
        app.add_exception_handler(kind, refuse)

    def running_pool():
        if state["draining"]:
            raise APIError(503, "the server is shutting down; retry", "server_error", code="shutting_down")
        if state["pool"] is None:
            raise APIError(503, "the server is not ready", "server_error", code="not_ready")
        return state["pool"]

    async def parse(model: type[GenerationFields], request: Request) -> GenerationFields:
        """The body as `model`, for the model served, once the pool runs: JSON with or without a Content-Type (not as
        a form or plain text: a browser may send those cross-site without asking). Unknown fields are refused or
        ignored by the rule in schemas.py."""
        content_type = request.headers.get("content-type", "").partition(";")[0].strip().lower()
        if content_type not in ("", "application/json", "text/json") and not content_type.endswith("+json"):
            raise APIError(415, f"the body must be JSON sent with `Content-Type: application/json` (this request "
                                f"says {ascii(content_type[:100])})", code="unsupported_media_type")
        try:
            raw = await request.body()
        except ClientDisconnect:  # gone before its body arrived (or closed by the body timeout): nobody reads this
            raise APIError(400, "the request body did not arrive", code="incomplete_body") from None
        try:
            body = model.model_validate_json(raw)
        except ValidationError as e:
            message, param = describe_validation_error(e.errors(include_url=False))
            raise APIError(400, message, param=param) from None
        unknown = body.unknown_fields()
        refused = [name for name in unknown if name in UNSUPPORTED]
        if refused:
            raise APIError(400, f"{refused[0]} is not supported by this server", param=refused[0],
                           code="unsupported_parameter")
        if unknown:
            record: RequestRecord = request.scope["gptx.record"]
            shown = [ascii(name[:64])[1:-1].replace(",", " ") for name in unknown[:MAX_IGNORED_NAMED]]
            record.ignored = shown + ([f"(+{len(unknown) - len(shown)} more)"] if len(unknown) > len(shown) else [])
            log.info("%s ignored unknown fields: %s", record.id, ", ".join(record.ignored))
        check_model(body.model)
        running_pool()  # 503 before any tokenizing while not ready or draining
        return body

    def check_model(name: str | None) -> None:
        if name is not None and name != config.model_name:
            raise APIError(404, f"model {name!r} is not served here; this server serves {config.model_name!r}",
                           param="model", code="model_not_found")

    def token_budget(requested: int | None, prompts: list[list[int]], default: int | None) -> int:
        """max_tokens checked against --max-tokens-limit and the context; a default is clamped to fit instead."""
        context, longest = engine.block_size, max(map(len, prompts))
        room = context - longest
        if room < 1 and requested != 0:  # max_tokens 0 scores a prompt: it may fill the context
            raise APIError(400, f"the prompt of {longest} tokens fills the model's context of {context} tokens",
                           param="prompt", code="context_length_exceeded")
        limit = config.max_tokens_limit
        if requested is None:
            return min(n for n in (default, limit, room) if n is not None)
        if limit is not None and requested > limit:
            raise APIError(400, f"max_tokens {requested} is over this server's limit of {limit}", param="max_tokens")
        if requested > room:
            raise APIError(400, f"the model's context is {context} tokens: {longest} in the prompt + {requested} "
                                f"new tokens do not fit; lower max_tokens or shorten the prompt",
                           param="max_tokens", code="context_length_exceeded")
        return requested

    async def encode(prompts: list, requested: int | None) -> list[list[int]]:
        """Token ids of each prompt; long texts are tokenized off the event loop. A text that certainly cannot fit is
        refused first, from its length alone: no token carries more than `max_token_bytes` bytes of text, so a text of
        B bytes is at least ceil(B / max_token_bytes) tokens (cheap, and never refuses a text that would fit)."""
        context = engine.block_size
        for text in (p for p in prompts if isinstance(p, str)):
            size = len(text) if text.isascii() else len(text.encode("utf-8", "surrogatepass"))
            tokens = math.ceil(size / max_token_bytes)
            if tokens >= context or (requested is not None and tokens + requested > context):
                raise APIError(400, f"the prompt of {size} bytes is at least {tokens} tokens: with {requested or 1} "
                                    f"new token(s) it cannot fit the model's context of {context} tokens",
                               param="prompt", code="context_length_exceeded")

        def tokenize():
            try:
                return [engine.prompt_ids(p) for p in prompts]
            except InvalidInput as e:
                raise APIError(400, str(e), param="prompt") from None

        if sum(len(p) for p in prompts if isinstance(p, str)) > OFF_LOOP_PROMPT_BYTES:
            return await asyncio.to_thread(tokenize)
        return tokenize()

    async def respond(request: Request, body: GenerationFields, prompts: list, max_tokens: int, stop: list[str],
                      fmt: CompletionFormat):
        record: RequestRecord = request.scope["gptx.record"]
        options = body.sampling()
        # best_of ranks samples by their logprobs: computed then, returned only when asked
        options["logprobs"] = fmt.logprobs if fmt.logprobs is not None or fmt.samples == fmt.n else 0
        if fmt.echo is not None and (fmt.logprobs is not None or max_tokens == 0):  # the prompt's own logprobs
            options["prompt_logprobs"] = fmt.logprobs or 0  # (max_tokens 0 scores the prompt: it needs them)
        gen = Generation(running_pool(), prompts, max_tokens, options, stop, record, metrics, live, fmt.samples)
        if body.stream:
            return StreamingResponse(stream_chunks(gen, fmt, body.stream_options or StreamOptions()),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        results = [Sampled() for _ in gen.streams]

        async def collect():
            async for i, event in gen.events():
                r = results[i]
                r.text.append(fmt.piece(i, event.text))
                r.tokens.extend(event.token_ids)
                r.logprobs.extend(event.logprobs)
                if event.prompt_logprobs is not None:
                    r.prompt_logprobs = event.prompt_logprobs

        try:
            await unless_disconnected(request, collect())
        except BaseException as e:
            gen.close(e)
            raise
        gen.close()
        return JSONResponse(fmt.envelope(fmt.object, fmt.choices(results, gen.finish), usage=gen.usage()))

    async def stream_chunks(gen: Generation, fmt: CompletionFormat, options: StreamOptions) -> AsyncIterator[str]:
        include_usage, continuous_usage = options.include_usage, options.continuous_usage_stats

        def usage() -> dict:  # every chunk carries `usage`: null, or the counts so far with continuous_usage_stats
            return {"usage": gen.usage()} if continuous_usage else {"usage": None} if include_usage else {}

        error = None  # a client that goes away cancels this generator: its rows count as cancelled
        try:
            for choice in fmt.opening():
                yield sse(fmt.envelope(fmt.chunk_object, [choice], **usage()))
            async for i, event in gen.events():
                text = fmt.piece(i, event.text)
                if text or event.finish_reason or (event.logprobs and fmt.logprobs is not None):
                    yield sse(fmt.envelope(fmt.chunk_object, [fmt.chunk_choice(i, text, event.finish_reason, event)],
                                           **usage()))
            if include_usage:
                yield sse(fmt.envelope(fmt.chunk_object, [], usage=gen.usage()))
            yield sse("[DONE]")
        except Exception as e:  # the pool shut down under this request (503) or the generation failed (500)
            error = e
            yield sse(as_api_error(e, gen.record, config.retry_after_seconds).body)
            if not isinstance(e, (APIError, GptxError)):  # a bug: its traceback goes to the log
                raise
            yield sse("[DONE]")
        finally:
            gen.close(error)

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await parse(CompletionRequest, request)
        if len(body.prompts()) > max_group(config.max_queue):  # the share of the queue one request may hold
            raise APIError(400, f"at most {max_group(config.max_queue)} prompts per request", param="prompt")
        prompts = await encode(body.prompts(), body.token_limit())
        max_tokens = token_budget(body.token_limit(), prompts, COMPLETIONS_DEFAULT_MAX_TOKENS)
        if body.echo and not engine.backend.capabilities.any_logits:
            raise APIError(400, "echo needs every prompt position's logits, and this export returns the last "
                                "position's only: re-export the model with this gptx", param="echo")
        echo = [(p if isinstance(p, str) else engine.tokenizer.decode(ids), ids)
                for p, ids in zip(body.prompts(), prompts)] if body.echo else None
        fmt = CompletionFormat(config.model_name, request.scope["gptx.record"], engine.tokenizer, body.logprobs, body.n,
                               body.samples(), echo)
        return await respond(request, body, prompts, max_tokens, body.stops(), fmt)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        body = await parse(ChatCompletionRequest, request)
        template = config.chat_template
        prompts = await encode([template.render([(m.role, m.text()) for m in body.messages])], body.token_limit())
        max_tokens = token_budget(body.token_limit(), prompts, None)
        fmt = ChatFormat(config.model_name, request.scope["gptx.record"], engine.tokenizer,
                         (body.top_logprobs or 0) if body.logprobs else None, n=body.n, samples=body.n)
        return await respond(request, body, prompts, max_tokens, [*body.stops(), *template.stop], fmt)

    card = {"id": config.model_name, "object": "model", "created": int(time.time()), "owned_by": "gptx",
            "max_model_len": engine.block_size}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [card]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str):
        check_model(model_id)
        return card

    @app.get("/health")
    async def health():
        if state["draining"]:
            return JSONResponse({"status": "draining"}, 503)
        if state["pool"] is None:
            return JSONResponse({"status": "starting or stopping"}, 503)
        stats = state["pool"].stats()
        return {"status": "ok", "model": config.model_name, "waiting": stats.waiting, "active": stats.active}

    @app.get("/metrics")
    async def prometheus():
        pool = state["pool"]
        return Response(metrics.render(pool.stats() if pool else None), media_type=metrics.content_type)

    return app


async def unless_disconnected(request: Request, work) -> None:
    """Run `work` (a non-streaming generation) but stop it when the client goes away, so its rows are freed."""
    async def disconnected() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    task, watch = asyncio.ensure_future(work), asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
        if not task.done():
            task.cancel()
            await asyncio.wait({task})  # let it unwind: its streams cancel their rows
    if task.cancelled():
        raise APIError(499, "the client closed the request")  # nobody reads it; logged as 499
    task.result()


def describe_validation_error(errors) -> tuple[str, str | None]:
    """pydantic's errors -> one message and OpenAI's `param` (the top-level field)."""
    first = errors[0]
    kind, message, loc = first["type"], first["msg"].removeprefix("Value error, "), [str(p) for p in first["loc"]]
    if kind == "json_invalid":
        return f"the body is not valid JSON ({first.get('ctx', {}).get('error', 'decode error')})", None
    if not loc and kind in ("model_type", "model_attributes_type"):
        return "the body must be a JSON object", None
    if not loc:  # a rule across fields, which names its first field first
        name = message.split(" ", 1)[0]
        return message, name if name in GenerationFields.model_fields else None
    # the field's path, up to the union member pydantic tried (tags such as "str" or "list[str]")
    path = list(itertools.takewhile(lambda p: "[" not in p and p not in ("str", "int", "float", "bool"), loc))
    where = ".".join(path)
    if kind in ("extra_forbidden", "missing"):
        return (f"unknown field {where!r}" if kind == "extra_forbidden" else f"{where} is required"), path[0]
    if len(path) < len(loc) and path[-1] in UNION_HINTS:
        return f"{where} must be {UNION_HINTS[path[-1]]}", path[0]
    return f"{where}: {message}", path[0]


UNION_HINTS = {
    "prompt": "a non-empty string, a list of strings, a list of token ids (>= 0) or a list of token-id lists",
    "stop": f"a string or a list of at most {MAX_STOP} strings",
    "content": "a string or a list of text parts",
}
