"""An embeddable async API over the scheduler: continuous batching for apps, without running a server.

    engine = gptx.runtime.load(DIR)
    async with engine.serving(max_batch=8, max_queue=64) as pool:
        done = await pool.generate("prompt", max_tokens=32, temperature=0)     # -> Completion
        async for piece in pool.stream("prompt", max_tokens=32): ...             # str pieces
        async for event in pool.events("prompt", max_tokens=32): ...             # Event: text, token_ids,
                                                                                 #        finish_reason
The scheduler steps in ONE worker thread; the event loop thread queues and cancels requests and receives each
step's outputs (`loop.call_soon_threadsafe`). Arguments are checked when a call is made (InvalidInput, QueueFull
raise before any await), so an HTTP layer can answer 400 / 429 before it starts a response. A caller that drops,
closes or cancels its iterator frees its row at the next step; leaving the `async with` cancels what is in flight.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import threading
from dataclasses import dataclass, field
from typing import AsyncIterator, Sequence

from .errors import GptxError
from .kv_cache import OnStep
from .request import Request, sample_ids
from .sampler import SamplingParams, TokenLogprob
from .scheduler import DEFAULT_PREFILL_CHUNK, DEFAULT_PREFIX_CACHE_MB, Scheduler, SchedulerStats, StepOutput


@dataclass
class Completion:
    text: str
    token_ids: list[int]          # every sampled token, the EOS that ended it included
    finish_reason: str            # "stop" | "length" | "cancelled"
    prompt_tokens: int
    completion_tokens: int


@dataclass
class Event:
    """One step of one request, for servers that stream (OpenAI chunks need text, token counts, finish_reason)."""
    text: str                     # new safe text (may be "" while a character or a possible stop is incomplete)
    token_ids: list[int]          # the tokens this step produced (one; none for a cancellation)
    finish_reason: str | None     # set on the last event only
    cached_tokens: int = 0        # on the first token: prompt tokens served from the prefix cache
    logprobs: list[TokenLogprob] = field(default_factory=list)  # the tokens' logprobs, when asked (`logprobs`)
    prompt_logprobs: list[TokenLogprob | None] | None = None     # on the first event, when asked: the prompt's


class RequestStream:
    """Async iterator of one request's Events; `cancel()` (or `aclose()`, or dropping it) frees its row."""

    def __init__(self, pool: Pool, request: Request):
        self.pool = pool
        self.id = request.id
        self.prompt_tokens = len(request.prompt_ids)
        self.finish_reason: str | None = None
        self._inbox: asyncio.Queue = asyncio.Queue()  # bounded by the request: max_tokens + 1 events at most

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> Event:
        if self.finish_reason is not None:
            raise StopAsyncIteration
        out: StepOutput = await self._inbox.get()
        if out.finished:
            self.finish_reason = out.finish_reason
            if out.error is not None:
                raise out.error
        return Event(out.text, [] if out.token_id is None else [out.token_id], out.finish_reason, out.cached_tokens,
                     [] if out.logprob is None else [out.logprob], out.prompt_logprobs)

    def cancel(self) -> None:
        if self.finish_reason is None:
            self.finish_reason = "cancelled"
            self.pool._cancel(self.id)

    async def aclose(self) -> None:
        self.cancel()

    async def __aenter__(self) -> RequestStream:
        return self

    async def __aexit__(self, *exc) -> None:
        self.cancel()

    def __del__(self):  # a caller that just drops the iterator still frees its row
        if self.finish_reason is None:
            # no wake-up here (it takes a lock the GC's thread may hold): a live request keeps the worker stepping
            self.pool.scheduler.remove_request(self.id)


class Pool:
    def __init__(self, engine, max_batch: int = 8, max_queue: int = 64, prefill_chunk: int = DEFAULT_PREFILL_CHUNK,
                 prefix_cache_mb: float = DEFAULT_PREFIX_CACHE_MB, on_step: OnStep | None = None):
        """prefill_chunk: prompt tokens computed per step, after the decode of the running rows; prefix_cache_mb:
        host memory for prompt blocks that later prompts starting the same way reuse (0: off). on_step(kind,
        seconds, batch) runs in the worker thread after each graph call ("prefill" | "decode")."""
        self.engine = engine
        self.scheduler = Scheduler(engine.backend, engine.tokenizer, eos_token_id=engine.eos_token_id,
                                   vocab_size=engine.vocab_size, max_batch=max_batch, max_queue=max_queue,
                                   prefill_chunk=prefill_chunk, prefix_cache_mb=prefix_cache_mb, on_step=on_step)
        self._inboxes: dict[str, asyncio.Queue] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._wake = threading.Event()
        self._closed = False  # set once, by aclose: the worker thread stops after its current step
        self._crash: BaseException | None = None

    # ------------------------------------------------------------------------------ lifecycle
    async def __aenter__(self) -> Pool:
        if self._thread is not None or self._closed:
            raise GptxError("a serving pool is entered once; open a new one with engine.serving()")
        self._loop = asyncio.get_running_loop()
        self._exited = self._loop.create_future()
        self._thread = threading.Thread(target=self._work, name="gptx-scheduler", daemon=True)
        self._thread.start()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Cancel what is in flight, stop and join the worker thread."""
        if self._thread is None or self._closed:
            return
        self._closed = True
        self._wake.set()
        await self._exited
        self._thread.join()
        for request_id in list(self._inboxes):
            self._deliver([StepOutput(request_id, None, "", True, "cancelled")])

    def stats(self) -> SchedulerStats:
        """Waiting requests, active rows, bounds and steps so far (cheap; any thread)."""
        return self.scheduler.stats()

    # ------------------------------------------------------------------------------ requests
    def events(self, prompt: str | Sequence[int], max_tokens: int | None = 64, **options) -> RequestStream:
        """Queue a request now (InvalidInput / QueueFull raise here) and return its stream of Events; the options
        are those of `samples`."""
        return self.samples(prompt, 1, max_tokens, **options)[0]

    def samples(self, prompt: str | Sequence[int], n: int, max_tokens: int | None = 64, temperature: float = 1.0,
                top_k: int | None = None, top_p: float | None = None, repetition_penalty: float = 1.0,
                seed: int | None = None, stop: str | Sequence[str] | None = None, stop_at_eos: bool = True,
                request_id: str | None = None, group: str | None = None, prompt_logprobs: int | None = None,
                **sampling) -> list[RequestStream]:
        """n streams of Events for one prompt, queued now: the prompt is computed once, then each sample draws with
        its own RNG (seed + j for sample j, so a seeded request reproduces every sample). max_tokens None = up to
        the context. `group` ties the prompts of one caller's request together: admission round-robins between
        groups, and one group holds at most half the queue. Further options: the SamplingParams fields
        presence_penalty, frequency_penalty, logit_bias, min_tokens, logprobs (each token's with that many
        alternatives), and prompt_logprobs (the prompt's; max_tokens 0 then only scores it)."""
        if self._loop is None or self._closed:
            raise GptxError("the pool is not running: use `async with engine.serving() as pool`")
        if self._crash is not None:
            raise GptxError(f"the serving pool stopped after an internal error: {self._crash!r}")
        params = SamplingParams(temperature, top_k, top_p, repetition_penalty, seed, **sampling)
        if isinstance(prompt, str) or (hasattr(prompt, "__len__") and len(prompt) == 0):
            prompt = self.engine.prompt_ids(prompt)  # tokenized (empty: <|endoftext|>); ids: checked by add_request
        request = Request(prompt, max_tokens, params, stop if stop is not None else (), stop_at_eos, group=group,
                          prompt_logprobs=prompt_logprobs, n=n)
        if request_id is not None:
            request.id = request_id
        request = self.scheduler.add_request(request)
        streams = [RequestStream(self, dataclasses.replace(request, id=i)) for i in sample_ids(request)]
        for stream in streams:
            self._inboxes[stream.id] = stream._inbox
        self._wake.set()
        return streams

    async def generate(self, prompt: str | Sequence[int], **options) -> Completion:
        """The whole completion (same options as `events`); cancelling the awaiting task frees the row."""
        stream = self.events(prompt, **options)
        text, ids = [], []
        try:
            async for event in stream:
                text.append(event.text)
                ids.extend(event.token_ids)
        finally:
            stream.cancel()  # a no-op when it finished; frees the row when this task was cancelled
        return Completion("".join(text), ids, stream.finish_reason, stream.prompt_tokens, len(ids))

    def stream(self, prompt: str | Sequence[int], **options) -> AsyncIterator[str]:
        """Text pieces as they are generated (same options as `events`; checked when called)."""
        return self._pieces(self.events(prompt, **options))

    @staticmethod
    async def _pieces(stream: RequestStream) -> AsyncIterator[str]:
        try:
            async for event in stream:
                if event.text:
                    yield event.text
        finally:
            stream.cancel()

    # ------------------------------------------------------------------------------ internals
    def _cancel(self, request_id: str) -> None:
        """Any thread (also __del__): the scheduler frees the row at its next step."""
        self.scheduler.remove_request(request_id)
        self._wake.set()

    def _work(self) -> None:
        """The worker thread: step while there is work, sleep on `_wake` otherwise."""
        try:
            while not self._closed:
                if not self.scheduler.has_work():
                    self._wake.wait()
                    self._wake.clear()
                    continue
                outputs = self.scheduler.step()
                if outputs:
                    self._to_loop(self._deliver, outputs)
        except BaseException as e:  # a bug in the step loop: fail every caller with it instead of hanging them
            self._crash = e
            self._to_loop(self._fail_all, e)
            raise
        finally:
            self._to_loop(self._exited.set_result, None)

    def _to_loop(self, fn, *args) -> None:
        with contextlib.suppress(RuntimeError):  # the event loop is already closed: nobody is left to tell
            self._loop.call_soon_threadsafe(fn, *args)

    def _deliver(self, outputs: list[StepOutput]) -> None:
        """Event loop thread: hand each output to its request's inbox."""
        for out in outputs:
            inbox = self._inboxes.pop(out.request_id, None) if out.finished else self._inboxes.get(out.request_id)
            if inbox is not None:
                inbox.put_nowait(out)

    def _fail_all(self, error: BaseException) -> None:
        self._deliver([StepOutput(rid, None, "", True, "error", error) for rid in list(self._inboxes)])
