"""Sequence classification on top of a GPT trunk: pool the last real token, a dropout + Linear head.

    model = GPTClassifier(GPT.from_pretrained("shakespeare"), num_classes=2)
    history = finetune_classifier(model, train_ids, train_labels, epochs=3)
    labels = predict(model, test_ids)

The causal trunk means the last non-padding token is the only position that has seen the whole
sequence, so that is the one pooled (as in GPT-2's `GPT2ForSequenceClassification`). Padding goes on
the right; it is found from `attention_mask` (1 = real token), else from `pad_token_id`, else every
row is taken as unpadded. Sequences may be given as lists of token lists of different lengths.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn as nn
from torch.nn import functional as F

from .model import GPT, as_index_tensor


class GPTClassifier(nn.Module):
    def __init__(self, gpt: GPT, num_classes: int, pad_token_id: int | None = None, dropout: float = 0.1):
        super().__init__()
        if not isinstance(gpt, GPT):
            raise TypeError(f"GPTClassifier expects a GPT trunk, got {type(gpt).__name__}")
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
            raise ValueError(f"num_classes must be an int >= 2, got {num_classes!r}")
        if pad_token_id is not None and not 0 <= pad_token_id < gpt.config.vocab_size:
            raise ValueError(f"pad_token_id {pad_token_id} is outside the vocabulary [0, {gpt.config.vocab_size})")
        self.gpt = gpt
        self.num_classes = num_classes
        self.pad_token_id = pad_token_id
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(gpt.config.n_embd, num_classes)
        nn.init.normal_(self.head.weight, std=0.02)
        nn.init.zeros_(self.head.bias)

    @property
    def device(self) -> torch.device:
        return self.head.weight.device

    def hidden_states(self, idx: torch.Tensor) -> torch.Tensor:
        """(B, T, n_embd) after the final LayerNorm; the LM head is never run."""
        t = self.gpt.transformer
        pos = torch.arange(idx.shape[1], dtype=torch.long, device=idx.device)
        x = t.drop(t.wte(idx) + t.wpe(pos))
        for block in t.h:
            x = block(x)
        return t.ln_f(x)

    def last_positions(self, idx: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        """Index of the last non-padding token in each row (right padding)."""
        B, T = idx.shape
        if attention_mask is None and self.pad_token_id is not None:
            attention_mask = (idx != self.pad_token_id).long()
        if attention_mask is None:
            return torch.full((B,), T - 1, dtype=torch.long, device=idx.device)
        mask = as_index_tensor(attention_mask, idx.device, name="attention_mask")
        if mask.shape != idx.shape:
            raise ValueError(f"attention_mask shape {tuple(mask.shape)} differs from idx shape {tuple(idx.shape)}")
        lengths = (mask != 0).long().sum(dim=1)
        if int(lengths.min()) == 0:
            raise ValueError("a row has no real tokens (attention_mask all 0 / all padding)")
        return lengths - 1

    def forward(self, idx, attention_mask=None, labels=None):
        if isinstance(idx, (list, tuple)) and idx and isinstance(idx[0], (list, tuple)):
            if attention_mask is None:
                idx, attention_mask = pad_batch(idx, self.pad_token_id or 0)
        idx = as_index_tensor(idx, self.device)
        self.gpt.check_tokens(idx)
        h = self.hidden_states(idx)
        last = self.last_positions(idx, attention_mask)
        pooled = h[torch.arange(idx.shape[0], device=idx.device), last]
        logits = self.head(self.dropout(pooled))
        loss = None
        if labels is not None:
            labels = torch.as_tensor(labels, dtype=torch.long, device=logits.device).view(-1)
            if labels.shape[0] != logits.shape[0]:
                raise ValueError(f"got {labels.shape[0]} labels for a batch of {logits.shape[0]}")
            if int(labels.min()) < 0 or int(labels.max()) >= self.num_classes:
                raise ValueError(f"labels must be in [0, {self.num_classes}), got {labels.min().item()}..{labels.max().item()}")
            loss = F.cross_entropy(logits, labels)
        return logits, loss


def pad_batch(seqs: Sequence[Sequence[int]], pad_token_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad token lists to (B, T_max); returns (idx, attention_mask)."""
    if not seqs:
        raise ValueError("no sequences given")
    lengths = [len(s) for s in seqs]
    if min(lengths) == 0:
        raise ValueError("empty sequence: every example needs at least one token")
    idx = torch.full((len(seqs), max(lengths)), pad_token_id, dtype=torch.long)
    mask = torch.zeros_like(idx)
    for i, s in enumerate(seqs):
        idx[i, : len(s)] = torch.as_tensor(list(s), dtype=torch.long)
        mask[i, : len(s)] = 1
    return idx, mask


def _as_batch(ids, attention_mask, pad_token_id):
    if isinstance(ids, torch.Tensor):
        idx = as_index_tensor(ids)
        if attention_mask is None:
            mask = (idx != pad_token_id).long() if pad_token_id is not None else torch.ones_like(idx)
        else:
            mask = as_index_tensor(attention_mask, name="attention_mask")
        return idx, mask
    return pad_batch(ids, pad_token_id or 0)


def finetune_classifier(model: GPTClassifier, train_ids, train_labels, *, val_ids=None, val_labels=None,
                        epochs: int = 3, lr: float = 1e-3, batch_size: int = 32, weight_decay: float = 0.01,
                        attention_mask=None, seed: int = 0, log=None) -> list[dict]:
    """Plain AdamW fine-tuning (trunk and head). Returns one {'epoch', 'loss', 'train_acc'[, 'val_acc']} per epoch."""
    idx, mask = _as_batch(train_ids, attention_mask, model.pad_token_id)
    labels = torch.as_tensor(train_labels, dtype=torch.long)
    if labels.shape[0] != idx.shape[0]:
        raise ValueError(f"{idx.shape[0]} examples but {labels.shape[0]} labels")
    if epochs <= 0 or batch_size <= 0 or lr <= 0:
        raise ValueError("epochs, batch_size and lr must be positive")
    gen = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    history = []
    n = idx.shape[0]
    for epoch in range(epochs):
        model.train()
        perm = torch.randperm(n, generator=gen)
        total, correct = 0.0, 0
        for start in range(0, n, batch_size):
            b = perm[start: start + batch_size]
            logits, loss = model(idx[b].to(model.device), mask[b].to(model.device), labels[b])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            total += loss.item() * len(b)
            correct += int((logits.argmax(-1).cpu() == labels[b]).sum())
        record = {"epoch": epoch + 1, "loss": total / n, "train_acc": correct / n}
        if val_ids is not None and val_labels is not None:
            record["val_acc"] = accuracy(model, val_ids, val_labels, batch_size=batch_size)
        history.append(record)
        if log is not None:
            log(", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in record.items()))
    model.eval()
    return history


@torch.no_grad()
def predict(model: GPTClassifier, ids, attention_mask=None, batch_size: int = 64, return_probs: bool = False):
    """Class index per example (a LongTensor), or (B, num_classes) probabilities with return_probs=True."""
    idx, mask = _as_batch(ids, attention_mask, model.pad_token_id)
    was_training = model.training
    model.eval()
    out = []
    for start in range(0, idx.shape[0], batch_size):
        logits, _ = model(idx[start: start + batch_size].to(model.device), mask[start: start + batch_size].to(model.device))
        out.append(logits.float().softmax(-1).cpu())
    model.train(was_training)
    probs = torch.cat(out)
    return probs if return_probs else probs.argmax(-1)


def accuracy(model: GPTClassifier, ids, labels, attention_mask=None, batch_size: int = 64) -> float:
    labels = torch.as_tensor(labels, dtype=torch.long)
    pred = predict(model, ids, attention_mask, batch_size=batch_size)
    return float((pred == labels).float().mean()) if len(labels) else math.nan
