"""The PyTorch reference sampler, the twin of runtime.sampler (same rules, same validation)."""

from __future__ import annotations

import torch

from runtime.sampler import validate_sampling


def logits_to_probs(logits: torch.Tensor, temperature: float, top_k: int | None, top_p: float | None):
    logits = logits.float() / temperature
    if top_k:
        k = min(top_k, logits.size(-1))
        kth = torch.topk(logits, k, dim=-1).values[..., -1, None]
        logits = torch.where(logits < kth, float("-inf"), logits)
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        probs = torch.softmax(sorted_logits, dim=-1)
        mass_before = probs.cumsum(-1) - probs
        sorted_logits = sorted_logits.masked_fill(mass_before >= top_p, float("-inf"))
        logits = torch.empty_like(logits).scatter_(-1, order, sorted_logits)
    return torch.softmax(logits, dim=-1)


def sample_next(logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None,
                top_p: float | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """(B, V) logits -> (B, 1) ids. temperature 0 is greedy."""
    validate_sampling(temperature, top_k, top_p)
    if temperature == 0:
        return torch.argmax(logits, dim=-1, keepdim=True)
    probs = logits_to_probs(logits, temperature, top_k, top_p)
    noise = torch.empty_like(probs).exponential_(1, generator=generator)
    return torch.argmax(probs / noise, dim=-1, keepdim=True)
