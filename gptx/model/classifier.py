"""Sequence classification on a GPT trunk: a dropout + Linear head on the last real token, the only position of a
causal model that has seen the whole row (as GPT-2's `GPT2ForSequenceClassification` pools).

    model = GPTClassifier(GPT.from_pretrained("shakespeare"), num_classes=2)
    history = finetune_classifier(model, train_ids, train_labels, epochs=3)
    labels = predict(model, test_ids)
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
from torch.nn import functional as F

from gptx.model.gpt import GPT
from gptx.model.inputs import as_token_batch, padding_mask
from gptx.runtime.errors import InvalidInput


class GPTClassifier(nn.Module):
    def __init__(self, gpt: GPT, num_classes: int, pad_token_id: int | None = None, dropout: float = 0.1):
        super().__init__()
        if not isinstance(gpt, GPT):
            raise TypeError(f"GPTClassifier expects a GPT trunk, got {type(gpt).__name__}")
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
            raise InvalidInput(f"num_classes must be an int >= 2, got {num_classes!r}")
        if pad_token_id is not None and not 0 <= pad_token_id < gpt.config.vocab_size:
            raise InvalidInput(f"pad_token_id {pad_token_id} is outside the vocabulary [0, {gpt.config.vocab_size})")
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

    def forward(self, idx, attention_mask=None, labels=None):
        """(logits (B, num_classes), loss or None). idx: a (B, T) batch padded on the right, or token lists of
        any lengths; padding is found from attention_mask, else from pad_token_id."""
        idx, mask = batch_and_mask(idx, attention_mask, self.pad_token_id)
        # the trunk's own forward pools each row's last real token; the LM head is never run
        pooled = self.gpt(idx, attention_mask=mask, return_logits=False).pooler_output
        logits = self.head(self.dropout(pooled))
        loss = None
        if labels is not None:
            labels = torch.as_tensor(labels, dtype=torch.long, device=logits.device).view(-1)
            if labels.shape[0] != logits.shape[0]:
                raise InvalidInput(f"got {labels.shape[0]} labels for a batch of {logits.shape[0]}")
            if int(labels.min()) < 0 or int(labels.max()) >= self.num_classes:
                raise InvalidInput(f"labels must be in [0, {self.num_classes}), got "
                                   f"{labels.min().item()}..{labels.max().item()}")
            loss = F.cross_entropy(logits, labels)
        return logits, loss


def batch_and_mask(ids, attention_mask=None, pad_token_id: int | None = None):
    """(B, T) ids and the mask of real tokens (or None: no padding). Token lists of different lengths are
    right-padded here; otherwise padding is what attention_mask says, else where the ids equal pad_token_id."""
    idx, mask = as_token_batch(ids, "idx", pad_id=pad_token_id or 0, attention_mask=attention_mask)
    if mask is None and pad_token_id is not None:
        mask = (idx != pad_token_id).long()
    return idx, mask


def _as_batch(ids, attention_mask, pad_token_id):
    """Whole-dataset tensors, so that minibatches are row slices."""
    idx, mask = batch_and_mask(ids, attention_mask, pad_token_id)
    mask = padding_mask(idx, mask, "idx")
    return idx, torch.ones_like(idx) if mask is None else mask


def finetune_classifier(model: GPTClassifier, train_ids, train_labels, *, val_ids=None, val_labels=None,
                        epochs: int = 3, lr: float = 1e-3, batch_size: int = 32, weight_decay: float = 0.01,
                        attention_mask=None, seed: int = 0, log=None) -> list[dict]:
    """Plain AdamW fine-tuning (trunk and head). Returns one {'epoch', 'loss', 'train_acc'[, 'val_acc']} per epoch."""
    idx, mask = _as_batch(train_ids, attention_mask, model.pad_token_id)
    labels = torch.as_tensor(train_labels, dtype=torch.long)
    if labels.shape[0] != idx.shape[0]:
        raise InvalidInput(f"{idx.shape[0]} examples but {labels.shape[0]} labels")
    if epochs <= 0 or batch_size <= 0 or lr <= 0:
        raise InvalidInput("epochs, batch_size and lr must be positive")
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
        rows = slice(start, start + batch_size)
        logits, _ = model(idx[rows].to(model.device), mask[rows].to(model.device))
        out.append(logits.float().softmax(-1).cpu())
    model.train(was_training)
    probs = torch.cat(out)
    return probs if return_probs else probs.argmax(-1)


def accuracy(model: GPTClassifier, ids, labels, attention_mask=None, batch_size: int = 64) -> float:
    labels = torch.as_tensor(labels, dtype=torch.long)
    pred = predict(model, ids, attention_mask, batch_size=batch_size)
    return float((pred == labels).float().mean()) if len(labels) else math.nan
