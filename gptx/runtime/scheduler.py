"""Continuous batching: the engine's one generation loop (onnxruntime-genai's add_request / step shape). Requests
join and leave the running batch at every step; the synchronous Engine calls and the async Pool both drive it.

One `step()`: retire cancelled requests; decode one token for every row whose prompt is in (one graph call, each
row at its own length, sampled with its own params and RNG); then prefill within a token budget (`prefill_chunk`):
partly prefilled rows first, oldest first, then waiting requests into the free rows (round-robin between request
groups), their leading blocks copied from the prefix cache. Decode runs first, so a long prompt costs the running
rows at most one budget of prefill per token (vLLM's token budget, llama.cpp's n_batch loop). A row's tokens depend
only on its prompt, params and seed. docs/architecture.md describes the loop in full.
"""

from __future__ import annotations

import dataclasses
import queue
import threading
from collections import OrderedDict, deque
from dataclasses import dataclass

import numpy as np

from .backends.base import Backend
from .errors import InvalidInput, QueueFull
from .kv_cache import KVCache, OnStep
from .prefix_cache import PrefixCache, export_identity
from .request import Request, checked, sample_ids
from .sampler import TokenLogprob, _is_int, _is_real, draw, non_finite_error, process, token_logprobs
from .text import TextStream
from .tokenizer import Tokenizer

DEFAULT_PREFILL_CHUNK = 64       # prompt tokens per step (docs/serving.md: why this number)
DEFAULT_PREFIX_CACHE_MB = 256    # host memory for reusable prompt blocks (0 turns reuse off)


def max_group(max_queue: int) -> int:
    """The most prompts one request (group) may hold in the queue: half of it, so others always find room."""
    return max(1, max_queue // 2)


@dataclass
class StepOutput:
    """What one step produced for one request. Fields may grow (per-token logprobs, say); callers read by name."""
    request_id: str
    token_id: int | None                  # the token sampled this step (None when cancelled / failed)
    text: str                             # the new safe text (UTF-8 whole, cut at a stop string)
    finished: bool = False
    finish_reason: str | None = None      # "stop" (EOS or stop string) | "length" | "cancelled" | "error"
    error: BaseException | None = None    # with finish_reason "error": what failed (traceback kept)
    cached_tokens: int = 0                # on a request's first token: prompt tokens served from the prefix cache
    logprob: TokenLogprob | None = None   # params.logprobs set: from the logits drawn from, before temperature
    prompt_logprobs: list[TokenLogprob | None] | None = None  # first output, when asked (the first token's is None)


@dataclass(frozen=True)
class SchedulerStats:
    waiting: int
    active: int
    max_batch: int
    max_queue: int
    steps: int
    cached_prompt_tokens: int = 0         # prompt tokens served from the prefix cache so far
    prefilled_prompt_tokens: int = 0      # prompt tokens computed so far


class _Row:
    """An admitted request: its text stream, RNG, seen tokens (for repetition penalty), progress."""

    __slots__ = ("request", "text", "rng", "seen", "counts", "last_token", "generated", "prefilled", "cached", "order",
                 "prompt_logprobs", "parent", "siblings")

    def __init__(self, request: Request, scheduler: Scheduler, parent: _Row | None = None):
        self.request = request
        eos = scheduler.eos_token_id if request.stop_at_eos else None
        stop = () if request.params.min_tokens else request.stop  # stop strings count from min_tokens on
        self.text = TextStream(scheduler.tokenizer, stop, eos) if scheduler.tokenizer is not None else None
        self.rng = request.params.rng()
        self.seen = None
        if request.params.repetition_penalty != 1.0:
            self.seen = np.zeros(scheduler.vocab_size, dtype=bool)
            self.seen[list(request.prompt_ids)] = True
        self.counts = np.zeros(scheduler.vocab_size, dtype=np.int32) if request.params.counts_tokens else None
        self.prompt_logprobs: list[TokenLogprob | None] | None = None if request.prompt_logprobs is None else [None]
        self.parent = parent  # a sibling sample: its row is a copy of the parent's once that prompt is in
        self.siblings: list[_Row] = []
        self.last_token = -1
        self.generated = 0
        self.prefilled = 0    # prompt tokens in the cache row
        self.cached = 0       # of which copied from the prefix cache
        self.order = scheduler._admitted  # admission order: partly prefilled rows continue oldest first

    @property
    def decoding(self) -> bool:
        return self.generated > 0


class Scheduler:
    def __init__(self, backend: Backend, tokenizer: Tokenizer | None, *, eos_token_id: int, vocab_size: int,
                 max_batch: int = 8, max_queue: int = 64, prefill_chunk: int = DEFAULT_PREFILL_CHUNK,
                 prefix_cache_mb: float = 0, on_step: OnStep | None = None):
        """tokenizer None: token ids only (no text, no stop strings). prefix_cache_mb 0: no prefix reuse (on
        by default in the serving pool, where requests share prompts; only host-memory caches can hold it)."""
        for name, value in (("max_batch", max_batch), ("max_queue", max_queue), ("prefill_chunk", prefill_chunk)):
            if not _is_int(value) or value < 1:
                raise InvalidInput(f"{name} must be an integer >= 1, got {value!r}")
        if not _is_real(prefix_cache_mb) or not 0 <= prefix_cache_mb < float("inf"):
            raise InvalidInput(f"prefix_cache_mb must be a number >= 0, got {prefix_cache_mb!r}")
        limit = backend.capabilities.max_batch
        if limit is not None and max_batch > limit:
            raise InvalidInput(f"max_batch {max_batch} exceeds what the {backend.name} backend takes ({limit})")
        self.backend = backend
        self.tokenizer = tokenizer
        self.eos_token_id = eos_token_id
        self.vocab_size = vocab_size
        self.max_queue = max_queue
        self.prefill_chunk = prefill_chunk
        self.context = backend.capabilities.max_seq
        self.cache = KVCache(backend, max_batch, pad_id=eos_token_id, on_step=on_step)
        self.prefixes = None
        if prefix_cache_mb and isinstance(self.cache.buffers[0], np.ndarray):
            self.prefixes = PrefixCache(int(prefix_cache_mb * 2**20), export_identity(backend.manifest))
        self.steps = self.cached_tokens = self.prefilled_tokens = self._admitted = 0  # counts so far
        self._rows: list[_Row] = []          # aligned with the cache's rows [0, active)
        self._lock = threading.Lock()        # guards the three below (add_request comes from other threads)
        self._groups: OrderedDict[str, deque[Request]] = OrderedDict()  # waiting, by group, in round-robin order
        self._waiting = 0
        self._known: set[str] = set()        # ids waiting or active
        # cancelled ids: SimpleQueue.put takes no lock a thread could already hold, so remove_request is safe
        # from any thread and from __del__ (which the garbage collector may run in the stepping thread)
        self._cancelled: queue.SimpleQueue[str] = queue.SimpleQueue()

    @property
    def max_batch(self) -> int:
        return self.cache.rows

    # ------------------------------------------------------------------------------ any thread
    def add_request(self, request: Request) -> Request:
        """Check (`request.checked`) and queue a request; returns the checked copy the scheduler runs. Every prompt
        counts against max_queue; one group may hold at most `max_group(max_queue)` of it."""
        request = checked(request, self.vocab_size, self.context, self.tokenizer is not None)
        if request.n > self.max_batch:
            raise InvalidInput(f"n {request.n} is more samples than the {self.max_batch} rows this server runs at once")
        group = request.group if request.group is not None else request.id
        with self._lock:
            if request.id in self._known:
                raise InvalidInput(f"request id {request.id!r} is already in use")
            if self._waiting >= self.max_queue:
                raise QueueFull(f"the queue is full ({self.max_queue} requests waiting); retry later")
            if len(self._groups.get(group, ())) >= max_group(self.max_queue):
                raise QueueFull(f"one request may hold at most {max_group(self.max_queue)} places of the queue")
            self._groups.setdefault(group, deque()).append(request)  # a new group joins the round-robin last
            self._waiting += 1
            self._known.update(sample_ids(request))
        return request

    def remove_request(self, request_id: str) -> None:
        """Cancel a request; its row is freed at the start of the next step (unknown ids are ignored)."""
        self._cancelled.put(request_id)

    def has_work(self) -> bool:
        with self._lock:
            return bool(self._waiting or self._rows) or not self._cancelled.empty()

    def stats(self) -> SchedulerStats:
        with self._lock:
            return SchedulerStats(self._waiting, len(self._rows), self.max_batch, self.max_queue, self.steps,
                                  self.cached_tokens, self.prefilled_tokens)

    # ------------------------------------------------------------------------------ step thread
    def step(self) -> list[StepOutput]:
        outputs: list[StepOutput] = []
        self._cancel(outputs)
        if any(r.decoding for r in self._rows):
            self._decode(outputs)
        self._prefill(outputs)
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
            for group, waiting in list(self._groups.items()):
                for request in [r for r in waiting if r.id in cancelled]:
                    waiting.remove(request)
                    self._waiting -= 1
                    self._known.discard(request.id)
                    outputs.append(StepOutput(request.id, None, "", True, "cancelled"))
                if not waiting:
                    del self._groups[group]
        # a sibling waiting for its parent's prompt goes with the parent (nothing else would fill its row)
        rows = [row for row, r in enumerate(self._rows) if r.request.id in cancelled or
                (r.parent is not None and r.prefilled == 0 and r.parent.request.id in cancelled)]
        outputs.extend(StepOutput(self._rows[row].request.id, None, "", True, "cancelled") for row in rows)
        self._retire(rows)

    def _decode(self, outputs: list[StepOutput]) -> None:
        live = np.fromiter((r.decoding for r in self._rows), dtype=bool, count=len(self._rows))
        tokens = np.fromiter((r.last_token if r.decoding else self.eos_token_id for r in self._rows),
                             dtype=np.int64, count=len(self._rows))
        rows = np.flatnonzero(live).tolist()
        try:
            logits = self.cache.decode(tokens, live)
        except Exception as e:  # a failed graph call fails the rows in it, not the scheduler (traceback kept)
            outputs.extend(StepOutput(self._rows[row].request.id, None, "", True, "error", e) for row in rows)
            self._retire(rows)
            return
        self._sample_and_emit(rows, logits[live], outputs)

    # -- prefill ------------------------------------------------------------------------------------
    def _admit(self, request: Request) -> int:
        """Claim a row for `request` and fill it from the prefix cache (at least the last prompt token is left
        to compute: its logits give the first token)."""
        row = self.cache.claim()
        self.cache.reserve(len(request.prompt_ids))
        state = _Row(request, self)
        self._admitted += 1
        for j, sample_id in enumerate(sample_ids(request)[1:], 1):  # rows for the other samples, filled later
            self.cache.claim()
            seed = request.params.seed
            params = request.params if seed is None else dataclasses.replace(request.params, seed=seed + j)
            state.siblings.append(_Row(dataclasses.replace(request, id=sample_id, params=params, n=1), self, state))
        self._rows += [state, *state.siblings]
        if self.prefixes is not None and request.prompt_logprobs is None:  # a scored prompt computes every token
            blocks = self.prefixes.match(request.prompt_ids, len(request.prompt_ids) - 1)
            if blocks:
                self.cache.write(row, blocks)
                state.prefilled = state.cached = int(self.cache.lengths[row])
                self.cached_tokens += state.cached
        return row

    def _plan(self) -> list[tuple[int, int, int]]:
        """(row, start, end) prompt chunks for this step within the budget: partly prefilled rows first, oldest
        first, then waiting requests into the free rows (round-robin between groups, FIFO within a group)."""
        budget, chunks = self.prefill_chunk, []
        pending = iter(sorted((r.order, row) for row, r in enumerate(self._rows)
                              if not r.decoding and r.parent is None and r.prefilled < len(r.request.prompt_ids)))
        while budget > 0:
            _, row = next(pending, (None, None))
            if row is None:
                with self._lock:
                    group = next(iter(self._groups), None)
                    if group is None or self._groups[group][0].n > self.cache.rows - self.cache.active:
                        break  # nothing waits, or the next request needs more rows (one per sample) than are free
                    request = self._groups[group].popleft()
                    self._waiting -= 1
                    if self._groups[group]:
                        self._groups.move_to_end(group)
                    else:
                        del self._groups[group]
                row = self._admit(request)
            state = self._rows[row]
            n = min(len(state.request.prompt_ids) - state.prefilled, budget)
            chunks.append((row, state.prefilled, state.prefilled + n))
            budget -= n
        return chunks

    def _prefill(self, outputs: list[StepOutput]) -> None:
        chunks = self._plan()
        done: list[tuple[int, np.ndarray]] = []   # rows whose prompt is now complete, with their logits
        failed: list[tuple[int, BaseException]] = []
        i = 0
        while i < len(chunks):
            # fresh chunks of one length on consecutive rows share a call (no padding, a contiguous block)
            j = i + 1
            row, start, end = chunks[i]
            scored = self._rows[row].prompt_logprobs is not None  # every position's logits, to score the prompt
            if start == 0:
                while j < len(chunks) and chunks[j][1] == 0 and chunks[j][2] == end and \
                        chunks[j][0] == chunks[j - 1][0] + 1 and \
                        (self._rows[chunks[j][0]].prompt_logprobs is not None) == scored:
                    j += 1
            group = chunks[i:j]
            i = j
            rows = [c[0] for c in group]
            tokens = [self._rows[r].request.prompt_ids[s:e] for r, s, e in group]
            try:
                if start == 0:
                    logits = self.cache.prefill(rows, tokens, every_position=scored)
                else:
                    logits = self.cache.extend(row, tokens[0], every_position=scored)
            except Exception as e:  # as in _decode: only these requests fail
                failed.extend((r, e) for r in rows)
                continue
            if scored:  # position p's logits score prompt token p + 1 (raw logits: no penalty or bias applies)
                for (r, s, e), every in zip(group, logits):
                    state = self._rows[r]
                    targets = state.request.prompt_ids[s + 1: e + 1]
                    if targets:
                        state.prompt_logprobs.extend(token_logprobs(every[:len(targets), : self.vocab_size], targets,
                                                                    state.request.prompt_logprobs))
                logits = np.stack([every[-1] for every in logits])
            for k, (r, s, e) in enumerate(group):
                state = self._rows[r]
                state.prefilled = e
                self.prefilled_tokens += e - s
                if self.prefixes is not None:  # the blocks this chunk completed: a few per step, not all at the end
                    self.prefixes.store(state.request.prompt_ids[:e], lambda a, b, r=r: self.cache.read(r, a, b),
                                        first_block=s // self.prefixes.block_tokens)
                if e == len(state.request.prompt_ids):
                    done.append((r, logits[k:k + 1]))
        # a parent's samples take copies of its row and draw from its logits, each with its own RNG
        for r, last in list(done):
            for sibling in self._rows[r].siblings:
                target = self._rows.index(sibling)
                self.cache.copy_row(r, target)
                sibling.prefilled = self._rows[r].prefilled
                sibling.prompt_logprobs = self._rows[r].prompt_logprobs
                done.append((target, last))
        for r, error in list(failed):
            failed.extend((self._rows.index(sibling), error) for sibling in self._rows[r].siblings)
        # a prompt scored without generating (max_tokens 0) ends here; every row retires after every chunk ran
        # (retiring moves rows)
        retire = [r for r, _ in done if self._rows[r].request.max_tokens == 0]
        outputs.extend(StepOutput(self._rows[r].request.id, None, "", True, "length",
                                  prompt_logprobs=self._rows[r].prompt_logprobs) for r in retire)
        done = [(r, x) for r, x in done if self._rows[r].request.max_tokens != 0]
        outputs.extend(StepOutput(self._rows[r].request.id, None, "", True, "error", e) for r, e in failed)
        retire += [r for r, _ in failed]
        if done:
            self._sample_and_emit([r for r, _ in done], np.concatenate([x for _, x in done]), outputs, retire)
        else:
            self._retire(retire)

    # -- sampling ------------------------------------------------------------------------------------
    def _sample_and_emit(self, rows: list[int], logits: np.ndarray, outputs: list[StepOutput],
                         retire: list[int] = ()) -> None:
        states = [self._rows[row] for row in rows]
        params = [s.request.params for s in states]
        seen = [s.seen for s in states] if any(s.seen is not None for s in states) else None
        counts = [s.counts for s in states] if any(s.counts is not None for s in states) else None
        processed = process(logits[:, : self.vocab_size], params, seen, counts, [s.generated for s in states],
                            self.eos_token_id)
        ids = draw(processed, params, [s.rng for s in states])
        done = list(retire)
        for k, (row, state, token) in enumerate(zip(rows, states, ids.tolist())):
            request = state.request
            if token < 0:
                outputs.append(StepOutput(request.id, None, "", True, "error", non_finite_error()))
                done.append(row)
                continue
            first = state.generated == 0
            logprob = None
            if request.params.logprobs is not None:
                (logprob,) = token_logprobs(processed[k:k + 1], [token], request.params.logprobs)
            state.last_token = token
            state.generated += 1
            if state.seen is not None:
                state.seen[token] = True
            if state.counts is not None:
                state.counts[token] += 1
            if state.text is not None:
                if state.generated == request.params.min_tokens:
                    state.text.stops = request.stop  # min_tokens reached: stop strings apply to what follows
                text = state.text.push(token)
                reason = "stop" if state.text.stopped else None
            else:
                text = ""
                reason = "stop" if request.stop_at_eos and token == self.eos_token_id else None
            if reason is None and state.generated >= request.max_tokens:
                reason = "length"
                if state.text is not None:
                    text += state.text.finish()
            outputs.append(StepOutput(request.id, token, text, reason is not None, reason,
                                      cached_tokens=state.cached if first else 0, logprob=logprob,
                                      prompt_logprobs=state.prompt_logprobs if first else None))
            if reason is not None:
                done.append(row)
        self._retire(done)

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
