"""What `GPT.forward` and `GPT.generate` accept (tensors, arrays, lists, ragged token lists), turned into (B, T)
LongTensors. Every check raises InvalidInput with one line that names the argument."""

from __future__ import annotations

import torch

from gptx.runtime.errors import InvalidInput


def as_token_batch(tokens, name: str = "idx", pad_id: int = 0, left: bool = False, attention_mask=None):
    """Token ids as a (B, T) LongTensor, and the (B, T) mask of real tokens: the padding made here, else the caller's
    `attention_mask` (may be None). Token lists of different lengths (what `Tokenizer.encode_batch` returns) are
    padded with `pad_id`, on the right unless `left`."""
    mask = None
    rows_given = isinstance(tokens, (list, tuple)) and tokens
    if rows_given and all(isinstance(r, (list, tuple)) or getattr(r, "ndim", None) == 1 for r in tokens):
        rows = [r.tolist() if hasattr(r, "tolist") else list(r) for r in tokens]
        lengths = [len(r) for r in rows]
        if 0 in lengths:
            raise InvalidInput(f"{name} row {lengths.index(0)} is empty: every row needs at least one token")
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
    if mask is not None and attention_mask is not None:
        raise InvalidInput(f"{name} rows of different lengths are padded here; attention_mask goes with a batch "
                           "you padded yourself")
    return tokens.long(), attention_mask if mask is None else mask


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


def padded_targets(targets, idx: torch.Tensor, mask: torch.Tensor | None, name: str) -> torch.Tensor:
    """(B, T) targets with -1 (ignored by the loss) wherever the input is padding."""
    from_lists = isinstance(targets, (list, tuple))
    targets, target_mask = as_token_batch(targets, "targets", pad_id=-1)
    if from_lists:  # compare row by row, so the error can say which row
        rows, target_rows = ([t.shape[1]] * t.shape[0] if m is None else m.sum(dim=1).tolist()
                             for t, m in ((idx, mask), (targets, target_mask)))
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
