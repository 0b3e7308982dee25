"""The fixed-batch loop: claim a row per prompt, prefill them in one call, then decode one token at a time.

Shaped like onnxruntime-genai's Generator (the caller may own the loop) and gpt-fast's prefill /
decode_one_token split. Backend-agnostic: it runs on the slot KV cache (gptx/runtime/kv_cache.py), the same
machinery the continuous-batching scheduler uses. `on_step(kind, seconds, batch)` reports each graph step
("prefill" | "decode") so benchmarks time the loop without patching it.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from .backends.base import Backend
from .errors import InvalidInput
from .kv_cache import KVCache, OnStep
from .sampler import Sampler, SamplingParams, validate_sampling



def check_prompt_ids(prompt, vocab_size: int) -> list[int]:
    """A prompt as a list of ints, each a vocabulary id (floats such as 1.5, bools and strings are refused)."""
    if isinstance(prompt, (str, bytes)) or not hasattr(prompt, "__len__"):
        raise InvalidInput(f"token ids must be a list of integers, got {type(prompt).__name__}")
    ids = []
    for t in np.asarray(prompt).tolist() if isinstance(prompt, np.ndarray) else prompt:
        if isinstance(t, bool) or not isinstance(t, (int, np.integer)):
            raise InvalidInput(f"token ids must be integers, got {t!r}")
        if not 0 <= t < vocab_size:
            raise InvalidInput(f"token id {t} is outside the vocabulary [0, {vocab_size})")
        ids.append(int(t))
    return ids


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


class Generator:
    """Owns one batch's cache rows and sampler. Use `generate_next()` until `is_done()`."""

    def __init__(self, backend: Backend, prompts: Sequence[Sequence[int]], max_new_tokens: int,
                 params: SamplingParams, eos_token_id: int | None, vocab_size: int, pad_id: int = 0,
                 on_step: OnStep | None = None):
        if not prompts or any(len(p) == 0 for p in prompts):
            raise InvalidInput("every prompt needs at least one token")
        prompts = [check_prompt_ids(p, vocab_size) for p in prompts]
        longest = max(len(p) for p in prompts)
        max_new_tokens = resolve_new_tokens(max_new_tokens, None, longest, backend.capabilities.max_seq)
        self.backend = backend
        self.prompts = prompts
        self.max_new_tokens = max_new_tokens
        self.eos_token_id = eos_token_id
        self.sampler = Sampler(params, vocab_size)
        self.batch = len(prompts)
        # the window starts at the bucket holding the prompts and grows as tokens come (attention covers ~filled slots)
        self.cache = KVCache(backend, self.batch, longest + 1, pad_id=pad_id, on_step=on_step)
        self.rows = [self.cache.claim() for _ in prompts]
        self.tokens: list[list[int]] = [[] for _ in prompts]
        self.steps = 0
        self.finished = np.zeros(self.batch, dtype=bool)
        self.seen = None
        if params.repetition_penalty != 1.0:
            self.seen = np.zeros((self.batch, vocab_size), dtype=bool)
            for row, p in enumerate(prompts):
                self.seen[row, p] = True
        self.last_logits: np.ndarray | None = None
        self.last_ids: np.ndarray | None = None

    def prefill(self) -> np.ndarray:
        return self.cache.prefill(self.rows, self.prompts)

    def decode_one_token(self, ids: np.ndarray) -> np.ndarray:
        return self.cache.decode(ids)

    def is_done(self) -> bool:
        return bool(self.finished.all()) or self.steps >= self.max_new_tokens

    def generate_next(self) -> np.ndarray:
        """Sample one token for every row; rows already finished get -1."""
        if self.is_done():
            raise RuntimeError("generation is finished")
        if self.last_ids is None:
            self.last_logits = self.prefill()
        else:
            self.last_logits = self.decode_one_token(self.last_ids)
        ids = self.sampler(self.last_logits, self.seen)
        self.steps += 1
        self.last_ids = ids
        out = np.where(self.finished, -1, ids)
        for row, tok in enumerate(out.tolist()):
            if tok >= 0:
                self.tokens[row].append(tok)
                if self.seen is not None:
                    self.seen[row, tok] = True
        if self.eos_token_id is not None:
            self.finished |= ids == self.eos_token_id
        return out

    def stop_row(self, row: int) -> None:
        """Mark a row finished (e.g. a stop string appeared); the batch goes on for the others."""
        self.finished[row] = True
