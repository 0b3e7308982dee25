"""What `GPT.forward` and `GPT.generate` accept, turned into what the transformer takes: (B, T) LongTensors.

Token ids come as tensors or arrays (T,) or (B, T), a list of ints or ragged token lists (what
`Tokenizer.encode_batch` returns, padded here); `attention_mask` marks real tokens in a batch the caller padded.
Every check raises InvalidInput with one line that names the argument.
"""

from __future__ import annotations

import numpy as np
import torch

from gptx.runtime.errors import InvalidInput


def is_row(x) -> bool:
    return isinstance(x, (list, tuple)) or (isinstance(x, (np.ndarray, torch.Tensor)) and x.ndim == 1)


def as_token_batch(tokens, name: str = "idx", pad_id: int = 0, left: bool = False):
    """Token ids as a (B, T) LongTensor, and a (B, T) mask (1 = real token) when rows had to be padded.

    Takes a tensor or array (T,) or (B, T), a list of ints, or a list of token lists. Lists of different
    lengths (what `Tokenizer.encode_batch` returns) are padded with `pad_id`, on the right unless `left`;
    the mask is None when nothing was padded.
    """
    mask = None
    if isinstance(tokens, (list, tuple)) and tokens and all(is_row(r) for r in tokens):
        rows = [r.tolist() if hasattr(r, "tolist") else list(r) for r in tokens]
        lengths = [len(r) for r in rows]
        for r, n in enumerate(lengths):
            if n == 0:
                raise InvalidInput(f"{name} row {r} is empty: every row needs at least one token")
        longest = max(lengths)
        if min(lengths) < longest:
            pads = [[pad_id] * (longest - n) for n in lengths]
            rows = [p + r if left else r + p for r, p in zip(rows, pads)]
            mask = torch.tensor([[0] * len(p) + [1] * n if left else [1] * n + [0] * len(p)
                                 for n, p in zip(lengths, pads)])
        tokens = rows
    if not isinstance(tokens, torch.Tensor):
        try:
            tokens = torch.tensor(tokens)
        except (TypeError, ValueError, RuntimeError):
            raise InvalidInput(f"{name} must be token ids: a tensor, a list of ints or a list of token lists") from None
    if tokens.numel() == 0:
        tokens = tokens.long()
    if tokens.dtype not in (torch.long, torch.int, torch.int32, torch.int16, torch.uint8):
        raise InvalidInput(f"{name} must hold integer token ids, got dtype {tokens.dtype}")
    if tokens.dim() == 1:
        tokens = tokens.unsqueeze(0)
    if tokens.dim() != 2:
        raise InvalidInput(f"{name} must have shape (B, T) or (T,), got {tuple(tokens.shape)}")
    return tokens.long(), mask


def with_padding_mask(tokens, attention_mask=None, name: str = "idx", pad_id: int = 0):
    """`as_token_batch`, and the attention mask that goes with it: the padding made here for token lists of
    different lengths, else the caller's `attention_mask` (may be None)."""
    idx, padded = as_token_batch(tokens, name, pad_id)
    if padded is None:
        return idx, attention_mask
    if attention_mask is not None:
        raise InvalidInput(f"{name} rows of different lengths are padded here; attention_mask goes with a batch "
                           "you padded yourself")
    return idx, padded


def as_index_tensor(idx, device=None, name: str = "idx") -> torch.Tensor:
    """A (B, T) LongTensor of equal-length token ids (no padding allowed)."""
    tokens, mask = as_token_batch(idx, name)
    if mask is not None:
        raise InvalidInput(f"{name} rows must all have the same length")
    return tokens.to(device) if device is not None else tokens


def check_tokens(idx: torch.Tensor, block_size: int, vocab_size: int, name: str = "idx") -> None:
    """Refuse an empty batch, one longer than the context, or ids outside the vocabulary."""
    T = idx.shape[1]
    if T == 0:
        raise InvalidInput(f"{name} is empty: give at least one token")
    if T > block_size:
        raise InvalidInput(f"sequence length {T} exceeds the model's block_size {block_size}")
    lo, hi = int(idx.min()), int(idx.max())
    if lo < 0 or hi >= vocab_size:
        raise InvalidInput(f"token id {lo if lo < 0 else hi} in {name} is outside the vocabulary [0, {vocab_size})")


def padding_mask(idx: torch.Tensor, attention_mask, name: str):
    """The (B, T) mask of real tokens, or None when every position is real (then the fused causal path runs)."""
    if attention_mask is None:
        return None
    mask, _ = as_token_batch(attention_mask, "attention_mask")
    if mask.shape != idx.shape:
        raise InvalidInput(f"attention_mask shape {tuple(mask.shape)} differs from {name} shape {tuple(idx.shape)}")
    mask = (mask != 0).long().to(idx.device)
    empty = (mask.sum(dim=1) == 0).nonzero()
    if len(empty):
        raise InvalidInput(f"attention_mask row {int(empty[0])} has no real tokens (all 0 / all padding)")
    return None if bool(mask.all()) else mask


def row_lengths(tokens: torch.Tensor, mask: torch.Tensor | None) -> list[int]:
    return mask.sum(dim=1).tolist() if mask is not None else [tokens.shape[1]] * tokens.shape[0]


def padded_targets(targets, idx: torch.Tensor, mask: torch.Tensor | None, name: str) -> torch.Tensor:
    """(B, T) targets with -1 (ignored by the loss) wherever the input is padding."""
    from_lists = isinstance(targets, (list, tuple))
    targets, target_mask = as_token_batch(targets, "targets", pad_id=-1)
    if from_lists:  # compare row by row, so the error can say which row
        rows, target_rows = row_lengths(idx, mask), row_lengths(targets, target_mask)
        if len(target_rows) != len(rows):
            raise InvalidInput(f"targets has {len(target_rows)} rows but {name} has {len(rows)}")
        for r, (n, m) in enumerate(zip(rows, target_rows)):
            if n != m:
                raise InvalidInput(f"targets row {r} has {m} tokens, which differs from its {n} input tokens "
                                   "(targets are the inputs shifted by one: the same length)")
    if targets.shape != idx.shape:
        raise InvalidInput(f"targets shape {tuple(targets.shape)} differs from {name} shape {tuple(idx.shape)}")
    targets = targets.to(idx.device)
    return targets if mask is None else targets.masked_fill(mask == 0, -1)


def last_real_positions(mask: torch.Tensor) -> torch.Tensor:
    """(B,) index of each row's last 1 in a (B, T) mask (right or left padding)."""
    return (mask * torch.arange(mask.shape[1], device=mask.device)).argmax(dim=1)


def new_token_count(prompt_len: int, max_new_tokens, max_length, block_size: int) -> int:
    """max_new_tokens, or max_length (the total, prompt included, as in transformers) minus the prompt: the
    runtime's rule. max_new_tokens alone may run past the context (the reference crops it, as nanoGPT does)."""
    from gptx.runtime.generation import resolve_new_tokens
    from gptx.runtime.sampler import validate_sampling

    if max_length is not None:
        return resolve_new_tokens(max_new_tokens, max_length, prompt_len, block_size)
    if max_new_tokens is None:
        raise InvalidInput("give max_new_tokens (tokens to add) or max_length (total length, prompt included)")
    validate_sampling(max_new_tokens=max_new_tokens)
    return int(max_new_tokens)
