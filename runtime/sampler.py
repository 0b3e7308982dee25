"""Next-token selection in numpy: greedy, temperature, top-k, top-p, repetition penalty, seeded.

Small pure functions (gpt-fast style) plus a `Sampler` that holds the RNG, so one seed gives one output.
Sampling uses argmax(p / Exp(1)), which draws from p exactly and vectorises over the batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def validate_sampling(temperature=1.0, top_k=None, top_p=None, repetition_penalty=1.0, max_new_tokens=None):
    """One place for the rules, shared by the runtime, the PyTorch reference and the CLI."""
    if temperature is None or not np.isfinite(temperature) or temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 means greedy), got {temperature}")
    if top_k is not None and (int(top_k) != top_k or top_k < 0):
        raise ValueError(f"top_k must be an integer >= 0 (0 or None disables it), got {top_k}")
    if top_p is not None and not (0 < top_p <= 1):
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if repetition_penalty is None or not repetition_penalty > 0:
        raise ValueError(f"repetition_penalty must be > 0 (1 disables it), got {repetition_penalty}")
    if max_new_tokens is not None and (int(max_new_tokens) != max_new_tokens or max_new_tokens < 0):
        raise ValueError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens}")


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    repetition_penalty: float = 1.0
    seed: int | None = None

    def __post_init__(self):
        validate_sampling(self.temperature, self.top_k, self.top_p, self.repetition_penalty)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def apply_repetition_penalty(logits: np.ndarray, seen: np.ndarray, penalty: float) -> np.ndarray:
    """CTRL-style: seen tokens' positive logits are divided by the penalty, negative ones multiplied."""
    if penalty == 1.0:
        return logits
    penalised = np.where(logits > 0, logits / penalty, logits * penalty)
    return np.where(seen, penalised, logits)


def top_k_filter(logits: np.ndarray, k: int | None) -> np.ndarray:
    if not k or k >= logits.shape[-1]:
        return logits
    kth = np.partition(logits, -k, axis=-1)[..., -k, None]
    return np.where(logits < kth, -np.inf, logits)


def top_p_filter(logits: np.ndarray, p: float | None) -> np.ndarray:
    """Keep the smallest set of most likely tokens whose mass reaches p (the top token always stays)."""
    if p is None or p >= 1.0:
        return logits
    order = np.argsort(-logits, axis=-1)
    sorted_logits = np.take_along_axis(logits, order, axis=-1)
    probs = softmax(sorted_logits)
    mass_before = np.cumsum(probs, axis=-1) - probs
    sorted_logits = np.where(mass_before >= p, -np.inf, sorted_logits)
    out = np.empty_like(logits)
    np.put_along_axis(out, order, sorted_logits, axis=-1)
    return out


def softmax(x: np.ndarray) -> np.ndarray:
    x = x - np.max(x, axis=-1, keepdims=True)
    e = np.exp(x)
    return e / np.sum(e, axis=-1, keepdims=True)


class Sampler:
    """Picks the next token for each row of a (B, V) logits array."""

    def __init__(self, params: SamplingParams, vocab_size: int):
        self.params = params
        self.vocab_size = vocab_size  # the model may pad its vocabulary; padded ids are never sampled
        self.rng = np.random.default_rng(params.seed)

    def __call__(self, logits: np.ndarray, seen: np.ndarray | None = None) -> np.ndarray:
        p = self.params
        logits = np.asarray(logits, dtype=np.float32)[:, : self.vocab_size]
        if seen is not None and p.repetition_penalty != 1.0:
            logits = apply_repetition_penalty(logits, seen[:, : self.vocab_size], p.repetition_penalty)
        if p.greedy:
            return np.argmax(logits, axis=-1)
        logits = top_p_filter(top_k_filter(logits / p.temperature, p.top_k), p.top_p)
        probs = softmax(logits)
        noise = self.rng.exponential(size=probs.shape)
        return np.argmax(probs / noise, axis=-1)
