"""The generation loop: left-pad a batch, prefill once, then decode one token at a time.

Shaped like onnxruntime-genai's Generator (the caller may own the loop) and gpt-fast's
prefill / decode_one_token split. Backend-agnostic: it only calls `backend.step`.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from .backends.base import Backend
from .sampler import Sampler, SamplingParams, validate_sampling


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """(ids, mask) of shape (B, longest prompt); shorter prompts are padded on the left."""
    longest = max(len(p) for p in prompts)
    ids = np.full((len(prompts), longest), pad_id, dtype=np.int64)
    mask = np.zeros((len(prompts), longest), dtype=np.int64)
    for row, prompt in enumerate(prompts):
        if len(prompt):
            ids[row, longest - len(prompt):] = prompt
            mask[row, longest - len(prompt):] = 1
    return ids, mask


class Generator:
    """Owns one batch's cache, positions and sampler. Use `generate_next()` until `is_done()`."""

    def __init__(self, backend: Backend, prompts: Sequence[Sequence[int]], max_new_tokens: int,
                 params: SamplingParams, eos_token_id: int | None, vocab_size: int, pad_id: int = 0):
        validate_sampling(params.temperature, params.top_k, params.top_p, params.repetition_penalty, max_new_tokens)
        if not prompts or any(len(p) == 0 for p in prompts):
            raise ValueError("every prompt needs at least one token")
        longest = max(len(p) for p in prompts)
        if longest + max_new_tokens > backend.block_size:
            raise ValueError(
                f"prompt of {longest} tokens + max_new_tokens {max_new_tokens} exceeds the model's "
                f"context of {backend.block_size} tokens"
            )
        for p in prompts:
            bad = [t for t in p if not 0 <= t < vocab_size]
            if bad:
                raise ValueError(f"token id {bad[0]} is outside the vocabulary [0, {vocab_size})")
        self.backend = backend
        self.max_new_tokens = max_new_tokens
        self.eos_token_id = eos_token_id
        self.sampler = Sampler(params, vocab_size)
        self.batch = len(prompts)
        self.prompt_ids, self.prompt_mask = left_pad(prompts, pad_id)
        self.cache = backend.new_cache(self.batch, max(longest + max_new_tokens, 1))
        self.next_pos = self.prompt_mask.sum(axis=1)  # position of each row's next token
        self.tokens: list[list[int]] = [[] for _ in prompts]
        self.steps = 0
        self.finished = np.zeros(self.batch, dtype=bool)
        self.seen = None
        if params.repetition_penalty != 1.0:
            self.seen = np.zeros((self.batch, vocab_size), dtype=bool)
            for row, p in enumerate(prompts):
                self.seen[row, list(p)] = True
        self.last_logits: np.ndarray | None = None

    def prefill(self) -> np.ndarray:
        positions = np.clip(np.cumsum(self.prompt_mask, axis=1) - 1, 0, None)
        return self.backend.step(self.prompt_ids, positions, self.prompt_mask, self.cache)

    def decode_one_token(self, ids: np.ndarray) -> np.ndarray:
        positions = self.next_pos[:, None].copy()
        self.next_pos += 1
        return self.backend.step(ids[:, None].astype(np.int64), positions, np.ones((self.batch, 1), np.int64), self.cache)

    def is_done(self) -> bool:
        return bool(self.finished.all()) or self.steps >= self.max_new_tokens

    def generate_next(self) -> np.ndarray:
        """Sample one token for every row; rows already finished get -1."""
        if self.is_done():
            raise RuntimeError("generation is finished")
        if self.last_logits is None:
            self.last_logits = self.prefill()
        else:
            self.last_logits = self.decode_one_token(self.last_ids)
        ids = self.sampler(self.last_logits, self.seen)
        self.steps += 1
        self.last_ids = ids
        out = np.where(self.finished, -1, ids)
        for row, tok in enumerate(out):
            if tok >= 0:
                self.tokens[row].append(int(tok))
                if self.seen is not None:
                    self.seen[row, tok] = True
        if self.eos_token_id is not None:
            self.finished |= ids == self.eos_token_id
        return out

    def stop_row(self, row: int) -> None:
        """Mark a row finished (e.g. a stop string appeared); the batch goes on for the others."""
        self.finished[row] = True
