"""What a caller asks for, checked once at the edge into the types the inner layers trust: `TokenIds` (a prompt
whose ids are known to be in the vocabulary) and `Request`, which `Scheduler.add_request` checks against the model
(`checked`); from then on nothing re-checks either.
"""

from __future__ import annotations

import dataclasses
import uuid
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from .errors import InvalidInput
from .sampler import MAX_LOGPROBS, SamplingParams, _is_int
from .text import normalize_stop


class TokenIds(tuple):
    """A prompt's token ids, each a vocabulary id (made by `token_ids` or the tokenizer: never re-checked)."""

    __slots__ = ()


def token_ids(prompt, vocab_size: int) -> TokenIds:
    """A prompt as TokenIds: ints, each a vocabulary id (floats such as 1.5, bools and strings are refused)."""
    if isinstance(prompt, TokenIds):
        return prompt
    if isinstance(prompt, (str, bytes)) or not hasattr(prompt, "__len__"):
        raise InvalidInput(f"token ids must be a list of integers, got {type(prompt).__name__}")
    ids = []
    for t in np.asarray(prompt).tolist() if isinstance(prompt, np.ndarray) else prompt:
        if isinstance(t, bool) or not isinstance(t, (int, np.integer)):
            raise InvalidInput(f"token ids must be integers, got {t!r}")
        if not 0 <= t < vocab_size:
            raise InvalidInput(f"token id {t} is outside the vocabulary [0, {vocab_size})")
        ids.append(int(t))
    return TokenIds(ids)


@dataclass
class Request:
    """One prompt to continue. `group` names the caller's request when it carries several prompts: admission
    round-robins between groups (a request without a group is a group of its own)."""

    prompt_ids: Sequence[int]
    max_tokens: int | None = 64           # new tokens at most; None = up to the context
    params: SamplingParams = SamplingParams()
    stop: str | Sequence[str] = ()        # empty strings are ignored
    stop_at_eos: bool = True
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    group: str | None = None
    prompt_logprobs: int | None = None    # each prompt token's logprob, with this many alternatives (echo);
                                          # max_tokens 0 then scores the prompt without generating
    n: int = 1                            # samples of the prompt, sharing its prefill (see Scheduler)


def sample_ids(request: Request) -> list[str]:
    """The ids the n samples of a request answer under: its own id for the first, `id/j` for the others."""
    return [request.id, *(f"{request.id}/{j}" for j in range(1, request.n))]


def checked(request: Request, vocab_size: int, context: int, has_text: bool = True) -> Request:
    """A copy of `request` with TokenIds, an int max_tokens that fits the context and a tuple of stop strings
    (InvalidInput otherwise). `has_text` False: no tokenizer, so stop strings cannot be matched."""
    prompt = token_ids(request.prompt_ids, vocab_size)
    if not prompt:
        raise InvalidInput("a request needs at least one prompt token")
    room = context - len(prompt)
    if request.max_tokens is None:
        if room < 1:
            raise InvalidInput(f"the prompt of {len(prompt)} tokens fills the model's context of {context}")
        max_tokens = room
    elif not _is_int(request.max_tokens) or request.max_tokens < (0 if request.prompt_logprobs is not None else 1):
        raise InvalidInput(f"max_tokens must be an integer >= 1 (0 only to score a prompt), got {request.max_tokens!r}")
    elif request.max_tokens > room:
        raise InvalidInput(f"prompt of {len(prompt)} tokens + max_tokens {request.max_tokens} exceeds the "
                           f"model's context of {context} tokens")
    else:
        max_tokens = int(request.max_tokens)
    if not isinstance(request.params, SamplingParams):
        raise InvalidInput("params must be a SamplingParams")
    if request.prompt_logprobs is not None and (not _is_int(request.prompt_logprobs)
                                                or not 0 <= request.prompt_logprobs <= MAX_LOGPROBS):
        raise InvalidInput(f"prompt_logprobs must be an integer in [0, {MAX_LOGPROBS}], "
                           f"got {request.prompt_logprobs!r}")
    if not _is_int(request.n) or request.n < 1:
        raise InvalidInput(f"n must be an integer >= 1, got {request.n!r}")
    outside = [t for t, _ in request.params.logit_bias if t >= vocab_size]
    if outside:
        raise InvalidInput(f"logit_bias names token {outside[0]}, outside the vocabulary [0, {vocab_size})")
    stop = normalize_stop(request.stop)
    if stop and not has_text:
        raise InvalidInput("stop strings need a tokenizer")
    return dataclasses.replace(request, prompt_ids=prompt, max_tokens=max_tokens, stop=stop,
                               stop_at_eos=bool(request.stop_at_eos))
