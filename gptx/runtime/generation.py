"""The synchronous calls' loop: a fixed batch of prompts stepped through the Scheduler in the caller's thread.

`Generation` is what `Engine.generator` returns (onnxruntime-genai's Generator shape) and what Engine.generate /
stream / generate_ids and `gptx bench` run: the same scheduler as the serving pool, so every rule is written once.
"""

from __future__ import annotations

from typing import Iterator, Sequence

import numpy as np

from .backends.base import Backend
from .errors import InvalidInput
from .kv_cache import OnStep
from .request import Request
from .sampler import SamplingParams, validate_sampling
from .scheduler import Scheduler, StepOutput
from .tokenizer import Tokenizer


def resolve_new_tokens(max_new_tokens: int | None, max_length: int | None, longest_prompt: int, context: int) -> int:
    """max_new_tokens, or max_length (the total incl. the prompt, as in transformers), never both; default 64.
    Checked against the context before any work."""
    if max_new_tokens is not None and max_length is not None:
        raise InvalidInput("pass max_new_tokens or max_length (prompt + new tokens), not both")
    if max_length is not None:
        if isinstance(max_length, bool) or not isinstance(max_length, (int, np.integer)) or max_length < 1:
            raise InvalidInput(f"max_length must be an integer >= 1, got {max_length!r}")
        if max_length > context:
            raise InvalidInput(f"max_length {max_length} exceeds the model's context of {context} tokens")
        if max_length < longest_prompt:
            raise InvalidInput(f"max_length {max_length} is shorter than the prompt ({longest_prompt} tokens)")
        return int(max_length) - longest_prompt
    new = 64 if max_new_tokens is None else max_new_tokens
    validate_sampling(max_new_tokens=new)
    if longest_prompt + new > context:
        raise InvalidInput(f"prompt of {longest_prompt} tokens + max_new_tokens {new} exceeds the model's "
                           f"context of {context} tokens")
    return int(new)


class Generation:
    """A fixed batch stepped by the caller: `generate_next()` until `is_done()`; `tokens`, `texts` per row."""

    def __init__(self, backend: Backend, tokenizer: Tokenizer | None, prompts: Sequence[Sequence[int]],
                 max_new_tokens: int, params: SamplingParams, *, eos_token_id: int, vocab_size: int,
                 stop_at_eos: bool = True, stop: str | Sequence[str] | None = (), on_step: OnStep | None = None):
        # every prompt is prefilled in the first step (the budget covers them all): later steps give each row a token
        self.scheduler = Scheduler(backend, tokenizer, eos_token_id=eos_token_id, vocab_size=vocab_size,
                                   max_batch=len(prompts), max_queue=len(prompts),
                                   prefill_chunk=max(sum(len(p) for p in prompts), 1), on_step=on_step)
        for i, prompt in enumerate(prompts):
            self.scheduler.add_request(Request(prompt, max_new_tokens, params, stop, stop_at_eos, id=str(i)))
        self.tokens: list[list[int]] = [[] for _ in prompts]
        self.texts: list[str] = ["" for _ in prompts]
        self.finish_reasons: list[str | None] = [None for _ in prompts]
        self.last_outputs: list[StepOutput] = []

    @property
    def cache(self):
        return self.scheduler.cache

    def is_done(self) -> bool:
        return all(r is not None for r in self.finish_reasons)

    def generate_next(self) -> np.ndarray:
        """One step: a token for every unfinished row (rows already finished, or stopped, get -1). A row whose
        generation failed (e.g. non-finite logits) raises its error here."""
        if self.is_done():
            raise RuntimeError("generation is finished")
        out = np.full(len(self.tokens), -1, dtype=np.int64)
        self.last_outputs = self.scheduler.step()
        for o in self.last_outputs:
            row = int(o.request_id)
            if o.error is not None:
                self.stop()
                raise o.error
            if o.token_id is not None:
                out[row] = o.token_id
                self.tokens[row].append(o.token_id)
            self.texts[row] += o.text
            if o.finished:
                self.finish_reasons[row] = o.finish_reason
        return out

    def steps(self) -> Iterator[list[StepOutput]]:
        """Step to the end, yielding each step's outputs; a caller that stops early finishes every row."""
        try:
            while not self.is_done():
                self.generate_next()
                yield self.last_outputs
        finally:
            if not self.is_done():
                self.stop()

    def stop_row(self, row: int) -> None:
        """Finish a row now (e.g. the caller saw what it wanted); the batch goes on for the others."""
        if self.finish_reasons[row] is None:
            self.finish_reasons[row] = "cancelled"
            self.scheduler.remove_request(str(row))

    def stop(self) -> None:
        """Finish every row (frees the cache rows at once)."""
        for row in range(len(self.tokens)):
            self.stop_row(row)
        self.scheduler.step()
