"""Continuous batching: requests join and leave the running batch at every step (onnxruntime-genai's Engine shape).

    scheduler.add_request(Request(prompt_ids, max_tokens, params, stop))   # any thread; QueueFull when full
    while scheduler.has_work():
        for out in scheduler.step(): ...                                    # one thread

One `step()`:
  1. retire cancelled requests (their rows are freed before any compute);
  2. decode: ONE graph call for every active row (each at its own length, kv_cache.py), sample each row with
     its own params and RNG, emit its token and new text, retire rows that hit EOS / a stop string / max_tokens;
  3. admit: pop waiting requests into the free rows and prefill them in ONE left-padded call (at most
     `max_prefill_tokens` padded tokens, so a burst of long prompts cannot stall the decode rows for long),
     sample and emit their first token. They join the decode call of the next step.
Decode runs before admission so rows freed by this step's retirements are refilled in the same step.

A row's tokens depend only on its prompt, params and seed: the graph treats rows independently (per-row mask
and positions) and the sampler draws from the row's own RNG.
"""

from __future__ import annotations

import queue
import threading
import uuid
from collections import deque
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from .backends.base import Backend
from .errors import InvalidInput, QueueFull
from .generation import check_prompt_ids
from .kv_cache import KVCache, OnStep
from .sampler import SamplingParams, _is_int, non_finite_error, sample
from .text import TextStream, normalize_stop
from .tokenizer import Tokenizer

DEFAULT_PREFILL_TOKENS = 2048


@dataclass
class Request:
    prompt_ids: Sequence[int]
    max_tokens: int | None = 64           # new tokens at most; None = up to the context
    params: SamplingParams = SamplingParams()
    stop: str | Sequence[str] = ()        # empty strings are ignored
    stop_at_eos: bool = True
    id: str = field(default_factory=lambda: uuid.uuid4().hex)


@dataclass
class StepOutput:
    request_id: str
    token_id: int | None                  # the token sampled this step (None when cancelled / failed)
    text: str                             # the new safe text (UTF-8 whole, cut at a stop string)
    finished: bool = False
    finish_reason: str | None = None      # "stop" (EOS or stop string) | "length" | "cancelled" | "error"
    error: BaseException | None = None    # with finish_reason "error": what failed (traceback kept)


@dataclass(frozen=True)
class SchedulerStats:
    waiting: int
    active: int
    max_batch: int
    max_queue: int
    steps: int


class _Row:
    """An admitted request: its text stream, RNG, seen tokens (for repetition penalty), last token."""

    __slots__ = ("request", "text", "rng", "seen", "last_token", "generated")

    def __init__(self, request: Request, text: TextStream, vocab_size: int):
        self.request = request
        self.text = text
        self.rng = request.params.rng()
        self.seen = None
        if request.params.repetition_penalty != 1.0:
            self.seen = np.zeros(vocab_size, dtype=bool)
            self.seen[list(request.prompt_ids)] = True
        self.last_token = -1
        self.generated = 0


class Scheduler:
    def __init__(self, backend: Backend, tokenizer: Tokenizer, *, eos_token_id: int, vocab_size: int,
                 max_batch: int = 8, max_queue: int = 64, max_prefill_tokens: int = DEFAULT_PREFILL_TOKENS,
                 on_step: OnStep | None = None):
        for name, value in (("max_batch", max_batch), ("max_queue", max_queue),
                            ("max_prefill_tokens", max_prefill_tokens)):
            if not _is_int(value) or value < 1:
                raise InvalidInput(f"{name} must be an integer >= 1, got {value!r}")
        limit = backend.capabilities.max_batch
        if limit is not None and max_batch > limit:
            raise InvalidInput(f"max_batch {max_batch} exceeds what the {backend.name} backend takes ({limit})")
        self.backend = backend
        self.tokenizer = tokenizer
        self.eos_token_id = eos_token_id
        self.vocab_size = vocab_size
        self.max_queue = max_queue
        self.max_prefill_tokens = max_prefill_tokens
        self.context = backend.capabilities.max_seq
        self.cache = KVCache(backend, max_batch, pad_id=eos_token_id, on_step=on_step)
        self.steps = 0
        self._rows: list[_Row] = []          # aligned with the cache's rows [0, active)
        self._lock = threading.Lock()        # guards the two below (add_request comes from other threads)
        self._waiting: deque[Request] = deque()
        self._known: set[str] = set()        # ids waiting or active
        # cancelled ids: SimpleQueue.put takes no lock a thread could already hold, so remove_request is safe
        # from any thread and from __del__ (which the garbage collector may run in the stepping thread)
        self._cancelled: queue.SimpleQueue[str] = queue.SimpleQueue()

    @property
    def max_batch(self) -> int:
        return self.cache.rows

    # ------------------------------------------------------------------------------ any thread
    def add_request(self, request: Request) -> None:
        """Check the request (ids in the vocabulary, fits the context, stop strings) and queue it."""
        prompt = check_prompt_ids(request.prompt_ids, self.vocab_size)
        if not prompt:
            raise InvalidInput("a request needs at least one prompt token")
        room = self.context - len(prompt)
        if request.max_tokens is None:
            if room < 1:
                raise InvalidInput(f"the prompt of {len(prompt)} tokens fills the model's context of {self.context}")
            max_tokens = room
        elif not _is_int(request.max_tokens) or request.max_tokens < 1:
            raise InvalidInput(f"max_tokens must be an integer >= 1, got {request.max_tokens!r}")
        elif request.max_tokens > room:
            raise InvalidInput(f"prompt of {len(prompt)} tokens + max_tokens {request.max_tokens} exceeds the "
                               f"model's context of {self.context} tokens")
        else:
            max_tokens = int(request.max_tokens)
        if not isinstance(request.params, SamplingParams):
            raise InvalidInput("params must be a SamplingParams")
        request.prompt_ids, request.max_tokens, request.stop = prompt, max_tokens, normalize_stop(request.stop)
        with self._lock:
            if request.id in self._known:
                raise InvalidInput(f"request id {request.id!r} is already in use")
            if len(self._waiting) >= self.max_queue:
                raise QueueFull(f"the queue is full ({self.max_queue} requests waiting); retry later")
            self._waiting.append(request)
            self._known.add(request.id)

    def remove_request(self, request_id: str) -> None:
        """Cancel a request; its row is freed at the start of the next step (unknown ids are ignored)."""
        self._cancelled.put(request_id)

    def has_work(self) -> bool:
        with self._lock:
            return bool(self._waiting or self._rows) or not self._cancelled.empty()

    def stats(self) -> SchedulerStats:
        with self._lock:
            return SchedulerStats(len(self._waiting), len(self._rows), self.max_batch, self.max_queue, self.steps)

    # ------------------------------------------------------------------------------ step thread
    def step(self) -> list[StepOutput]:
        outputs: list[StepOutput] = []
        self._cancel(outputs)
        if self._rows:
            self._decode(outputs)
        admitted = self._pop_admissible()
        if admitted:
            self._prefill(admitted, outputs)
        with self._lock:
            self.steps += 1
        return outputs

    def _cancel(self, outputs: list[StepOutput]) -> None:
        cancelled = set()
        while not self._cancelled.empty():
            cancelled.add(self._cancelled.get())
        if not cancelled:
            return
        with self._lock:
            for request in [r for r in self._waiting if r.id in cancelled]:
                self._waiting.remove(request)
                self._known.discard(request.id)
                outputs.append(StepOutput(request.id, None, "", True, "cancelled"))
        rows = [row for row, r in enumerate(self._rows) if r.request.id in cancelled]
        outputs.extend(StepOutput(self._rows[row].request.id, None, "", True, "cancelled") for row in rows)
        self._retire(rows)

    def _decode(self, outputs: list[StepOutput]) -> None:
        rows = range(len(self._rows))
        tokens = np.fromiter((r.last_token for r in self._rows), dtype=np.int64, count=len(self._rows))
        try:
            logits = self.cache.decode(tokens)
        except Exception as e:  # a failed graph call fails the rows in it, not the scheduler (traceback kept)
            self._fail(list(rows), e, outputs)
            return
        self._sample_and_emit(list(rows), logits, outputs)

    def _pop_admissible(self) -> list[Request]:
        """FIFO into the free rows while the padded prefill stays within max_prefill_tokens (one always fits)."""
        free = self.cache.rows - self.cache.active
        batch: list[Request] = []
        longest = 0
        with self._lock:
            while self._waiting and len(batch) < free:
                width = max(longest, len(self._waiting[0].prompt_ids))
                if batch and width * (len(batch) + 1) > self.max_prefill_tokens:
                    break
                batch.append(self._waiting.popleft())
                longest = width
        return batch

    def _prefill(self, requests: list[Request], outputs: list[StepOutput]) -> None:
        rows = [self.cache.claim() for _ in requests]
        for request in requests:
            eos = self.eos_token_id if request.stop_at_eos else None
            self._rows.append(_Row(request, TextStream(self.tokenizer, request.stop, eos), self.vocab_size))
        try:
            logits = self.cache.prefill(rows, [r.prompt_ids for r in requests])
        except Exception as e:  # as in _decode: only these requests fail
            self._fail(rows, e, outputs)
            return
        self._sample_and_emit(rows, logits, outputs)

    def _sample_and_emit(self, rows: list[int], logits: np.ndarray, outputs: list[StepOutput]) -> None:
        states = [self._rows[row] for row in rows]
        seen = [s.seen for s in states] if any(s.seen is not None for s in states) else None
        ids = sample(logits[:, : self.vocab_size], [s.request.params for s in states], [s.rng for s in states], seen)
        done = []
        for row, state, token in zip(rows, states, ids.tolist()):
            request = state.request
            if token < 0:
                outputs.append(StepOutput(request.id, None, "", True, "error", non_finite_error()))
                done.append(row)
                continue
            state.last_token = token
            state.generated += 1
            if state.seen is not None:
                state.seen[token] = True
            text = state.text.push(token)
            reason = None
            if state.text.stopped:
                reason = "stop"
            elif state.generated >= request.max_tokens:
                reason = "length"
                text += state.text.finish()
            outputs.append(StepOutput(request.id, token, text, reason is not None, reason))
            if reason is not None:
                done.append(row)
        self._retire(done)

    def _fail(self, rows: list[int], error: BaseException, outputs: list[StepOutput]) -> None:
        outputs.extend(StepOutput(self._rows[row].request.id, None, "", True, "error", error) for row in rows)
        self._retire(rows)

    def _retire(self, rows: list[int]) -> None:
        """Free rows, highest first: the last active row moves into each hole, and a row still to be freed is
        never the one that moves."""
        for row in sorted(rows, reverse=True):
            moved = self.cache.free(row)
            request_id = self._rows[row].request.id
            if moved is not None:
                self._rows[row] = self._rows[moved]
            self._rows.pop()
            with self._lock:
                self._known.discard(request_id)
