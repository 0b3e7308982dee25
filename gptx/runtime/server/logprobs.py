"""OpenAI's logprobs shapes from the runtime's TokenLogprob: the completions object and chat's content list. A token's
text is its bytes decoded as UTF-8 with replacement (a token may hold part of a character); chat's `bytes` are exact."""

from __future__ import annotations

from ..sampler import TokenLogprob
from ..tokenizer import Tokenizer


def token_text(tokenizer: Tokenizer, token: int) -> str:
    return tokenizer.decode_bytes([token]).decode("utf-8", errors="replace")


def completion_logprobs(tokenizer: Tokenizer, tokens: list[int], entries: list[TokenLogprob | None],
                        offset: int = 0) -> dict:
    """The completions `logprobs` object for `tokens` (entries[i] None: no logprob, as for a prompt's first);
    text offsets count from `offset`."""
    out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for token, entry in zip(tokens, entries):
        text = token_text(tokenizer, token)
        out["tokens"].append(text)
        out["token_logprobs"].append(None if entry is None else entry.logprob)
        out["top_logprobs"].append(None if entry is None else
                                   {token_text(tokenizer, t): lp for t, lp in entry.top} or None)
        out["text_offset"].append(offset)
        offset += len(text)
    return out


def chat_logprobs(tokenizer: Tokenizer, entries: list[TokenLogprob]) -> dict:
    """Chat's `logprobs`: {"content": [{token, logprob, bytes, top_logprobs}]}."""
    def one(token: int, logprob: float) -> dict:
        return {"token": token_text(tokenizer, token), "logprob": logprob,
                "bytes": list(tokenizer.decode_bytes([token]))}

    return {"content": [{**one(e.token_id, e.logprob), "top_logprobs": [one(t, lp) for t, lp in e.top]}
                        for e in entries]}


def best(logprobs: list[list[TokenLogprob]], n: int) -> list[int]:
    """Indices of the n samples with the highest cumulative logprob, best first (ties: the earlier sample)."""
    totals = [sum(e.logprob for e in entries) for entries in logprobs]
    return sorted(range(len(totals)), key=lambda k: (-totals[k], k))[:n]
