"""Next-token selection in numpy, per row: greedy, temperature, top-k, top-p, repetition / presence / frequency
penalties, logit_bias, min_tokens, and the chosen tokens' logprobs.

`process` applies the rules that change the logits; `draw` picks from them (temperature, top-k, top-p); logprobs
are the log-softmax of the processed logits before temperature (vLLM's default, like OpenAI's). Each row draws one
uniform number per token from its own `np.random.Generator`, so its output is a pure function of its logits, params
and seed, never of the other rows in the batch: what continuous batching needs. Small pure functions (gpt-fast
style) state the rules, written to avoid sorting or cumsumming the whole vocabulary each step.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from .errors import GenerationError, InvalidInput

GREEDY_BELOW = 1e-5  # temperatures below this are greedy: dividing by them would overflow float32 logits
LOGIT_BOUND = 1e30  # penalties never move a finite logit past this: logits / temperature and their differences
                    # stay finite for every temperature >= GREEDY_BELOW
MAX_LOGPROBS = 20  # most alternatives per token a request may ask logprobs for (OpenAI's chat limit)
TOP_P_CANDIDATES = 64  # top-p first looks at the 64 most likely tokens; the whole row only if they hold < p
CUMSUM_BLOCK = 256  # weights per first-level sum in cumsum_search: about 200 blocks over GPT-2's vocabulary


def _is_int(x) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def _is_real(x) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


def validate_sampling(temperature=1.0, top_k=None, top_p=None, repetition_penalty=1.0, max_new_tokens=None,
                      seed=None, presence_penalty=0.0, frequency_penalty=0.0, logit_bias=(), min_tokens=0,
                      logprobs=None):
    """One place for the rules, shared by the runtime, the PyTorch reference and the CLI (InvalidInput)."""
    if not _is_real(temperature) or not np.isfinite(temperature) or temperature < 0:
        raise InvalidInput(f"temperature must be a number >= 0 (0 means greedy), got {temperature!r}")
    if top_k is not None and (not _is_int(top_k) or top_k < 0):
        raise InvalidInput(f"top_k must be an integer >= 0 (0 or None disables it), got {top_k!r}")
    if top_p is not None and (not _is_real(top_p) or not 0 < top_p <= 1):
        raise InvalidInput(f"top_p must be a number in (0, 1], got {top_p!r}")
    if not _is_real(repetition_penalty) or not np.isfinite(repetition_penalty) or not repetition_penalty > 0:
        raise InvalidInput(f"repetition_penalty must be a number > 0 (1 disables it), got {repetition_penalty!r}")
    if max_new_tokens is not None and (not _is_int(max_new_tokens) or max_new_tokens < 0):
        raise InvalidInput(f"max_new_tokens must be an integer >= 0, got {max_new_tokens!r}")
    if seed is not None and (not _is_int(seed) or seed < 0):
        raise InvalidInput(f"seed must be an integer >= 0 (or None for fresh entropy), got {seed!r}")
    for name, value in (("presence_penalty", presence_penalty), ("frequency_penalty", frequency_penalty)):
        if not _is_real(value) or not -2 <= value <= 2:
            raise InvalidInput(f"{name} must be a number in [-2, 2] (0 disables it), got {value!r}")
    for token, bias in logit_bias:
        if not _is_int(token) or token < 0:
            raise InvalidInput(f"logit_bias keys must be token ids >= 0, got {token!r}")
        if not _is_real(bias) or not -100 <= bias <= 100:
            raise InvalidInput(f"logit_bias values must be numbers in [-100, 100], got {bias!r}")
    if not _is_int(min_tokens) or min_tokens < 0:
        raise InvalidInput(f"min_tokens must be an integer >= 0, got {min_tokens!r}")
    if logprobs is not None and (not _is_int(logprobs) or not 0 <= logprobs <= MAX_LOGPROBS):
        raise InvalidInput(f"logprobs must be an integer in [0, {MAX_LOGPROBS}] (or None for none), got {logprobs!r}")


@dataclass(frozen=True)
class SamplingParams:
    """How one row picks its tokens. The penalties follow OpenAI's definitions: presence_penalty is subtracted
    once from every token generated so far, frequency_penalty once per time it was generated; logit_bias
    ({token id: -100..100}, stored as sorted pairs) is added; until `min_tokens` tokens are out, EOS cannot be
    drawn. repetition_penalty (CTRL) covers the prompt too. `logprobs`: how many alternatives each token's
    logprob comes with (None: no logprobs; 0: the chosen token's only)."""

    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    repetition_penalty: float = 1.0
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: tuple[tuple[int, float], ...] = ()
    min_tokens: int = 0
    logprobs: int | None = None

    def __post_init__(self):
        bias = self.logit_bias.items() if isinstance(self.logit_bias, dict) else self.logit_bias or ()
        object.__setattr__(self, "logit_bias", tuple(sorted((k, v) for k, v in bias)))
        validate_sampling(**vars(self))  # every field is a validate_sampling argument of the same name

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW

    @property
    def counts_tokens(self) -> bool:
        """Whether drawing needs the row's generated-token counts (presence / frequency penalty)."""
        return self.presence_penalty != 0 or self.frequency_penalty != 0

    @property
    def processes_logits(self) -> bool:
        """Whether any rule changes the logits before the draw (`process_row`)."""
        return self.repetition_penalty != 1.0 or self.counts_tokens or bool(self.logit_bias) or self.min_tokens > 0

    def rng(self) -> np.random.Generator:
        """A fresh generator for one row: `default_rng(seed)`, or fresh entropy when seed is None."""
        return np.random.default_rng(self.seed)


# ---------------------------------------------------------------------------------------------- the rules
def apply_repetition_penalty(logits: np.ndarray, seen: np.ndarray, penalty: float) -> np.ndarray:
    """CTRL-style: seen tokens' positive logits are divided by the penalty, negative ones multiplied; finite
    logits stay within +-LOGIT_BOUND (a penalty of 1e-300 would overflow them to inf)."""
    if penalty == 1.0:
        return logits
    with np.errstate(over="ignore", divide="ignore", invalid="ignore"):  # float32: 1e-300 is 0, 1e300 is inf
        penalised = np.where(logits > 0, logits / penalty, logits * penalty)
    penalised = np.where(np.isfinite(logits), np.clip(penalised, -LOGIT_BOUND, LOGIT_BOUND), logits)
    return np.where(seen, penalised, logits)


def apply_presence_frequency(logits: np.ndarray, counts: np.ndarray, presence: float, frequency: float) -> np.ndarray:
    """OpenAI's penalties: logit[j] -= counts[j] * frequency + (counts[j] > 0) * presence, counts over the tokens
    generated so far."""
    return logits - counts * np.float32(frequency) - (counts > 0) * np.float32(presence)


def process_row(logits: np.ndarray, params: SamplingParams, seen: np.ndarray | None = None,
                counts: np.ndarray | None = None, generated: int = 0, eos_token_id: int | None = None) -> np.ndarray:
    """The logits one row draws from, before temperature (`logits` itself when no rule applies): repetition penalty
    (`seen`: prompt and generated tokens), presence / frequency penalty (`counts`: generated tokens), logit_bias,
    and EOS held back while fewer than min_tokens tokens were `generated`."""
    if seen is not None:
        logits = apply_repetition_penalty(logits, seen, params.repetition_penalty)
    if counts is not None and params.counts_tokens:
        logits = apply_presence_frequency(logits, counts, params.presence_penalty, params.frequency_penalty)
    if params.logit_bias:
        ids = np.array([k for k, _ in params.logit_bias], dtype=np.int64)
        inside = ids < len(logits)
        logits = logits.copy()
        logits[ids[inside]] += np.array([v for _, v in params.logit_bias], dtype=np.float32)[inside]
    if eos_token_id is not None and generated < params.min_tokens:
        logits = logits.copy()
        logits[eos_token_id] = -np.inf
    return logits


@dataclass(frozen=True)
class TokenLogprob:
    """A chosen token's logprob and the `top` most likely alternatives (id, logprob), best first."""
    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


def token_logprobs(logits: np.ndarray, tokens: Sequence[int], top: int = 0) -> list[TokenLogprob]:
    """Logprobs of `tokens[i]` under `logits[i]` (N, V), each with its `top` best alternatives (ties in id order):
    the logits the sampler drew from, before temperature, or a prompt's raw logits."""
    x = np.asarray(logits, dtype=np.float64)  # float64: logprobs near 0 keep their digits
    with np.errstate(invalid="ignore"):  # an all -inf row gives NaN, as the model's own would
        shifted = x - np.max(x, axis=-1, keepdims=True)
        logp = shifted - np.log(np.sum(np.exp(shifted), axis=-1, keepdims=True))
    out = []
    for row, token in zip(logp, tokens):
        best = ()
        if top:
            ids = np.argpartition(-row, top - 1)[:top] if top < len(row) else np.arange(len(row))
            ids = ids[np.lexsort((ids, -row[ids]))]
            best = tuple((int(i), float(row[i])) for i in ids)
        out.append(TokenLogprob(int(token), float(row[token]), best))
    return out


# ---------------------------------------------------------------------------------------------- per row
def cumsum_search(weights: np.ndarray, fraction: float, total: float | None = None, side: str = "right") -> int:
    """np.searchsorted(cdf, fraction * total, side), cdf = np.cumsum(weights, dtype=np.float64), total = cdf[-1]
    unless given; len(weights) when the target is past the end. Hand-written for speed: numpy's cumsum over 50k
    weights is a scalar loop (0.2 ms, plus page faults for its output); here block sums are vectorized (25 us) and
    only the block holding the target is cumsummed (results differ only by rounding in the last bit)."""
    n = len(weights)
    if n == 0:
        return 0
    starts = np.arange(0, n, CUMSUM_BLOCK)
    block_cdf = np.cumsum(np.add.reduceat(weights, starts, dtype=np.float64))
    target = fraction * (block_cdf[-1] if total is None else total)
    b = int(np.searchsorted(block_cdf, target, side=side))
    if b >= len(starts):
        return n
    inner = np.cumsum(weights[starts[b]: starts[b] + CUMSUM_BLOCK], dtype=np.float64)
    inner += block_cdf[b - 1] if b else 0.0
    return int(starts[b]) + min(int(np.searchsorted(inner, target, side=side)), len(inner) - 1)


def _nucleus(weights: np.ndarray, ids: np.ndarray | None, top_p: float, total: float):
    """The top_p nucleus of the candidates as (ids, weights) (ids None: ids are positions): the most likely ones
    whose mass before them (of `total`) is < top_p, ties in index order; None when all of them hold less. Sorts
    values only (SIMD sort: 0.3 ms over 50k, a stable argsort 5.6 ms), then keeps as many ties at the cut as needed."""
    desc = np.sort(weights)[::-1]
    first = cumsum_search(desc, top_p, total, side="left")  # the mass through `first` reaches top_p
    if first == len(desc):
        return None
    cut = desc[first]
    keep = weights > cut
    ties = np.flatnonzero(weights == cut)
    keep[ties[: first + 1 - int(np.count_nonzero(keep))]] = True
    chosen = np.flatnonzero(keep)
    return (chosen if ids is None else ids[chosen]), weights[chosen]


def candidates(logits: np.ndarray, params: SamplingParams) -> tuple[np.ndarray | None, np.ndarray]:
    """(ids, weights) of the tokens a draw may pick: weights = exp(logits / T - max), ids None meaning the whole
    row; logits not finite -> ids of length 0. Top-k keeps the k highest of logits / T (ties at the k-th all stay);
    top-p then the smallest most likely set whose mass reaches p, looking at the whole row only when the
    TOP_P_CANDIDATES best hold less. Temporaries are few and reused (a new 50k array can cost 0.2-0.4 ms of faults)."""
    x = logits / np.float32(params.temperature)
    vocab = x.shape[0]
    k, top_p = params.top_k, params.top_p
    ids = None
    if k and k < vocab:
        ids = np.argpartition(x, vocab - k)[vocab - k:]
        kth = x[ids].min()
        if np.count_nonzero(x >= kth) > k:  # ties at the k-th value all stay
            ids = np.flatnonzero(x >= kth)
        x = x[ids]
    top = x.max()
    if not np.isfinite(top):
        return np.empty(0, np.int64), x[:0]
    weights = np.exp(np.subtract(x, top, out=x), out=x)  # x is a new array: ours to overwrite
    if top_p is not None and top_p < 1.0:
        total = float(weights.sum(dtype=np.float64))  # top-p mass is relative to the top-k set
        if ids is None:
            m = min(TOP_P_CANDIDATES, vocab)
            part = np.sort(np.argpartition(weights, vocab - m)[vocab - m:])  # index order: ties as a stable sort
            kept = _nucleus(weights[part], part, top_p, total) or _nucleus(weights, None, top_p, total)
        else:
            kept = _nucleus(weights, ids, top_p, total)
        ids, weights = kept
    return ids, weights


def sample_row(logits: np.ndarray, params: SamplingParams, rng: np.random.Generator) -> int:
    """One draw (one uniform number from the row's own RNG) for one row of penalised logits; -1 if not finite."""
    ids, weights = candidates(logits, params)
    if ids is not None and len(ids) == 0:
        return -1
    pick = min(cumsum_search(weights, rng.random()), len(weights) - 1)  # inverse-CDF sampling
    return int(ids[pick]) if ids is not None else pick


def process(logits: np.ndarray, params: Sequence[SamplingParams], seen=None, counts=None, generated=None,
            eos_token_id: int | None = None) -> np.ndarray:
    """(B, V) float32 -> the logits each row draws from (`process_row` per row, with seen[r], counts[r],
    generated[r] where given); `logits` itself when no row has a rule to apply."""
    logits = np.asarray(logits, dtype=np.float32)
    rows = [r for r, p in enumerate(params) if p.processes_logits]
    if not rows:
        return logits
    logits = logits.copy()
    for r in rows:
        logits[r] = process_row(logits[r], params[r], None if seen is None else seen[r],
                                None if counts is None else counts[r], 0 if generated is None else generated[r],
                                eos_token_id)
    return logits


def sample(logits: np.ndarray, params: Sequence[SamplingParams], rngs: Sequence[np.random.Generator],
           seen: np.ndarray | Sequence[np.ndarray | None] | None = None, counts=None, generated=None,
           eos_token_id: int | None = None) -> np.ndarray:
    """Next id per row (-1 where the logits are not finite); row r uses only params[r], rngs[r] and its history
    (see `process`). Callers that also want logprobs `process`, then `draw` and read them from the same logits."""
    return draw(process(logits, params, seen, counts, generated, eos_token_id), params, rngs)


def draw(logits: np.ndarray, params: Sequence[SamplingParams], rngs: Sequence[np.random.Generator]) -> np.ndarray:
    """Next id per row from already processed logits (temperature, top-k, top-p here); -1 where not finite.
    Greedy rows share one argmax; the others draw one by one (a batch holds at most a few dozen rows)."""
    ids = np.empty(len(logits), dtype=np.int64)
    greedy = [r for r, p in enumerate(params) if p.greedy]
    if len(greedy) == len(params):
        ids[:] = np.argmax(logits, axis=-1)
    elif greedy:
        ids[greedy] = np.argmax(logits[greedy], axis=-1)
    if greedy:
        # argmax picks a NaN or +inf if there is one, and an all -inf row picks -inf: checking the pick suffices
        bad = ~np.isfinite(logits[greedy, ids[greedy]])
        if bad.any():
            ids[np.asarray(greedy)[bad]] = -1
    for r, p in enumerate(params):
        if not p.greedy:
            ids[r] = sample_row(logits[r], p, rngs[r])
    return ids


class Sampler:
    """Picks the next token for each row of a (B, V) logits array, all rows with the same params."""

    def __init__(self, params: SamplingParams, vocab_size: int):
        self.params = params
        self.vocab_size = vocab_size  # the model may pad its vocabulary; padded ids are never sampled
        self.rngs: list[np.random.Generator] = []  # one per row, made on first use

    def __call__(self, logits: np.ndarray, seen: np.ndarray | None = None) -> np.ndarray:
        rows = len(logits)
        self.rngs += [self.params.rng() for _ in range(rows - len(self.rngs))]
        logits = np.asarray(logits)[:, : self.vocab_size]
        if seen is not None:
            seen = seen[:, : self.vocab_size]
        ids = sample(logits, [self.params] * rows, self.rngs, seen)
        if (ids < 0).any():
            raise non_finite_error()
        return ids


def non_finite_error() -> GenerationError:
    return GenerationError("the model produced non-finite logits (NaN or inf): its weights may be corrupt or "
                           "overflow in this precision; check the export with `gptx verify`")
