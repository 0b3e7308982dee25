"""The GPT-2 model as in nanoGPT's model.py, with GPT-2's tanh GELU and transformers-style inputs and outputs.

There is one transformer forward: training, the classifier, reference generation and the exported KV-cache step
(`gptx/export/kv_step.py`) all run `GPT.body`; only the attention differs, chosen by argument. Weights: `weights.py`.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from operator import itemgetter
from typing import Sequence

import numpy as np
import torch
import torch.nn as nn
from torch.nn import functional as F

from gptx.model.inputs import as_token_batch, check_tokens, padded_targets, padding_mask
from gptx.runtime.errors import InvalidInput


@dataclass
class GPTConfig:
    block_size: int = 1024
    vocab_size: int = 50304  # GPT-2's 50257 padded up to a multiple of 64 for speed
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0
    bias: bool = True  # biases in Linear and LayerNorm, as in GPT-2

    def __post_init__(self):
        for name in ("block_size", "vocab_size", "n_layer", "n_head", "n_embd"):
            if getattr(self, name) <= 0:
                raise InvalidInput(f"GPTConfig.{name} must be positive, got {getattr(self, name)}")
        if self.n_embd % self.n_head:
            raise InvalidInput(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def hidden_size(self) -> int:
        """transformers' name for n_embd (read-only)."""
        return self.n_embd

    def to_dict(self) -> dict:
        return asdict(self)


class GPTOutput(tuple):
    """The 2-tuple `(logits, loss)` with transformers-style attributes: `last_hidden_state` (B, T, n_embd) after
    ln_f, and `pooler_output` (B, n_embd), each row's last real token (the only one that has seen the whole row)."""

    def __new__(cls, logits, loss, last_hidden_state, pooler_output):
        out = super().__new__(cls, (logits, loss))
        out.last_hidden_state = last_hidden_state
        out.pooler_output = pooler_output
        return out

    def __getnewargs__(self):  # copy / pickle rebuild it through __new__
        return (*self, self.last_hidden_state, self.pooler_output)

    logits = property(itemgetter(0))
    loss = property(itemgetter(1))


def cast_to(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """x in `dtype`, untouched when it already is (fp32 graphs get no no-op Casts, which block ORT fusions): each
    module casts its input to its weights' dtype and its output back, which makes the fp16 export's islands."""
    return x if x.dtype == dtype else x.to(dtype)


def attention_allowed(attention_mask: torch.Tensor, past_len, new_len) -> torch.Tensor:
    """(B, 1, T, P+T) bool: slot j is visible to new token i if it is filled (mask 1) and not in its future.
    Each token always sees itself, so a padding position never gets an all-masked softmax (NaN)."""
    device = attention_mask.device
    j = torch.arange(past_len + new_len, device=device)[None, :]
    i = torch.arange(new_len, device=device)[:, None] + past_len
    filled = attention_mask[:, None, None, :].bool()
    return (filled & (j <= i)) | (j == i)


def cached_attention(q, k, v, past_k, past_v, bias):
    """Softmax over [past | new] without concatenating the cache, so the exported step can take the runtime's whole
    preallocated cache as the past (`bias`, 0 or -inf per slot, masks the empty slots) and never copy it."""
    scale = 1.0 / math.sqrt(q.shape[-1])
    scores = torch.cat([q @ past_k.transpose(-1, -2), q @ k.transpose(-1, -2)], dim=-1) * scale
    scores = cast_to(scores, torch.float32)  # the softmax accumulates in fp32, also in fp16 exports
    probs = cast_to(torch.softmax(scores + bias, dim=-1), q.dtype)
    past_len = past_k.shape[2]
    return probs[..., :past_len] @ past_v + probs[..., past_len:] @ v


class CausalSelfAttention(nn.Module):
    # (B, T, ...) -> (B, T, *tail), heads split or merged; the export swaps in one that traces to a single ONNX
    # Reshape (gptx/export/kv_step.py)
    reshape_tail = staticmethod(lambda x, tail: x.reshape(*x.shape[:2], *tail))

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.n_embd = config.n_embd
        self.head_dim = config.head_dim
        self.dropout = config.dropout

    def forward(self, x, mask: torch.Tensor | None = None, past: tuple | None = None):
        """-> (output (B, T, C), (k, v) of these T tokens). No mask: SDPA's causal kernel; a (B, 1, T, T) bool mask
        from `attention_allowed`: padded batches; `past` (k, v): the cached step over [past | x], with the
        (B, 1, T, P+T) float bias that the exported step builds as mask."""
        x = cast_to(x, self.c_attn.weight.dtype)
        q, k, v = (self.reshape_tail(t, (-1, self.head_dim)).transpose(1, 2)
                   for t in self.c_attn(x).split(self.n_embd, dim=2))
        if past is not None:
            y = cached_attention(q, k, v, *past, mask)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None,
                                               dropout_p=self.dropout if self.training else 0.0)
        return self.resid_dropout(self.c_proj(self.reshape_tail(y.transpose(1, 2), (-1,)))), (k, v)


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        x = cast_to(x, self.c_fc.weight.dtype)
        # GPT-2 was trained with the tanh approximation; exact GELU drifts from its checkpoints.
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x), approximate="tanh")))


class Block(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x, mask: torch.Tensor | None = None, past: tuple | None = None):
        """-> (x, (k, v)). The residual stream keeps x's dtype; `mask`/`past` pick the attention (see there)."""
        y, kv = self.attn(self.ln_1(x), mask, past)
        x = x + cast_to(y, x.dtype)
        return x + cast_to(self.mlp(self.ln_2(x)), x.dtype), kv


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        if not isinstance(config, GPTConfig):
            raise TypeError(f"GPT expects a GPTConfig, got {type(config).__name__}")
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            wpe=nn.Embedding(config.block_size, config.n_embd),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
            ln_f=nn.LayerNorm(config.n_embd, bias=config.bias),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.transformer.wte.weight = self.lm_head.weight  # weight tying, as in GPT-2
        self.apply(self._init_weights)
        # GPT-2 paper: scale the residual projections by 1/sqrt(2 * n_layer)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                torch.nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    @staticmethod
    def _init_weights(module):
        if isinstance(module, nn.Linear):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                torch.nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def get_num_params(self, non_embedding: bool = True) -> int:
        """Parameter count; position embeddings are left out by default (token ones are tied to the head)."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.transformer.wpe.weight.numel()
        return n

    @property
    def device(self) -> torch.device:
        return self.lm_head.weight.device

    def body(self, idx, pos, mask: torch.Tensor | None = None, past: Sequence[tuple] | None = None):
        """Embeddings and every block: the residual stream (B, T, C) before ln_f, and each layer's (k, v).
        `pos` is (T,) or (B, T); `mask` and `past` (one (k, v) per layer): see `CausalSelfAttention.forward`."""
        tr = self.transformer
        x = tr.drop(cast_to(tr.wte(idx), tr.wpe.weight.dtype) + tr.wpe(pos))
        presents = []
        for i, block in enumerate(tr.h):
            x, kv = block(x, mask, None if past is None else past[i])
            presents.append(kv)
        return x, presents

    def forward(self, idx=None, targets=None, *, input_ids=None, attention_mask=None,
                return_logits: bool = True) -> GPTOutput:
        """GPTOutput (unpacks as `logits, loss`): logits for every position, and the mean cross-entropy over real
        target positions if `targets` (same shape or ragged lists; -1 and padding ignored) is given. idx / input_ids:
        a (B, T) or (T,) tensor, a list of ints, or token lists of any lengths (right-padded here). attention_mask:
        (B, T), 1 = real token, for a batch padded on either side; positions count real tokens only, so a padded row
        gives the same outputs as the row alone. return_logits=False skips the LM head (poolers)."""
        if (idx is None) == (input_ids is None):
            raise InvalidInput("forward needs token ids once: model(idx) or model(input_ids=...), not both")
        idx, name = (idx, "idx") if input_ids is None else (input_ids, "input_ids")
        idx, attention_mask = as_token_batch(idx, name, attention_mask=attention_mask)
        idx = idx.to(self.device)
        check_tokens(idx, self.config.block_size, self.config.vocab_size, name)
        mask = padding_mask(idx, attention_mask, name)
        if targets is not None:
            if not return_logits:
                raise InvalidInput("a loss needs the logits: drop return_logits=False or targets")
            targets = padded_targets(targets, idx, mask, name)
        B, T = idx.shape
        if mask is None:  # every position real: no mask to build, SDPA's causal kernel
            x, _ = self.body(idx, torch.arange(T, device=idx.device))
        else:
            x, _ = self.body(idx, (mask.cumsum(dim=1) - 1).clamp(min=0), attention_allowed(mask, 0, T))
        hidden = self.transformer.ln_f(x)
        last = None if mask is None else (mask * torch.arange(T, device=mask.device)).argmax(dim=1)  # last real token
        pooled = hidden[:, -1] if last is None else hidden[torch.arange(B, device=idx.device), last]
        logits = self.lm_head(cast_to(hidden, self.lm_head.weight.dtype)) if return_logits else None
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1), ignore_index=-1)
        return GPTOutput(logits, loss, hidden, pooled)

    def crop_block_size(self, block_size: int) -> None:
        """Shrink the context window (e.g. load gpt2 then use 256 positions)."""
        if not 0 < block_size <= self.config.block_size:
            raise InvalidInput(f"block_size must be in (0, {self.config.block_size}], got {block_size}")
        self.config.block_size = block_size
        self.transformer.wpe.weight = nn.Parameter(self.transformer.wpe.weight[:block_size])

    @classmethod
    def from_pretrained(cls, name_or_path: str, override_args: dict | None = None) -> "GPT":
        """gpt2, gpt2-medium, gpt2-large, gpt2-xl, `shakespeare`, a local HF GPT-2 directory or a nanoGPT `.pt`."""
        from gptx.model.weights import load_pretrained

        return load_pretrained(name_or_path, override_args)

    @torch.no_grad()
    def generate(self, idx, max_new_tokens: int | None = None, temperature: float = 1.0, top_k: int | None = None,
                 top_p: float | None = None, *, max_length: int | None = None, repetition_penalty: float = 1.0,
                 seed: int | None = None):
        """Reference generation: re-runs the whole context each step (no cache), so it is slow but obviously right.
        The runtime's own sampler picks the tokens (temperature 0: greedy), so a seed gives the runtime's tokens.
        A tensor or equal-length lists give a (B, T + new) tensor; ragged lists (left-padded here) give token lists.
        Past block_size, max_new_tokens slides the context window (nanoGPT); max_length must fit in it."""
        from gptx.runtime.generation import resolve_new_tokens
        from gptx.runtime.sampler import Sampler, SamplingParams

        params = SamplingParams(temperature, top_k, top_p, repetition_penalty, seed)
        idx, mask = as_token_batch(idx, "idx", left=True)
        ragged, (B, T), window = mask is not None, idx.shape, self.config.block_size
        if max_new_tokens is None and max_length is None:
            raise InvalidInput("give max_new_tokens (tokens to add) or max_length (total length, prompt included)")
        # the runtime's rule, except that max_new_tokens alone may run past the context (the window slides, as nanoGPT)
        new_tokens = resolve_new_tokens(max_new_tokens, max_length, T, window if max_length is not None else math.inf)
        check_tokens(idx, window, self.config.vocab_size)
        idx = idx.to(self.device)
        mask = (torch.ones_like(idx) if mask is None else mask).to(self.device)
        sampler = Sampler(params, self.config.vocab_size)
        seen = None
        if params.repetition_penalty != 1.0:  # the prompt's real tokens count as seen
            seen = torch.zeros(B, self.config.vocab_size, dtype=torch.long).scatter_add_(1, idx.cpu(), mask.cpu())
            seen = seen.bool().numpy()
        for _ in range(new_tokens):
            # the LM head on the last position only (the pooled one: generation rows always end in a real token)
            last = self(idx[:, -window:], attention_mask=mask[:, -window:], return_logits=False).pooler_output
            logits = self.lm_head(cast_to(last, self.lm_head.weight.dtype))
            next_ids = sampler(logits.float().cpu().numpy(), seen)
            if seen is not None:
                seen[np.arange(B), next_ids] = True
            idx = torch.cat((idx, torch.as_tensor(next_ids, dtype=torch.long, device=idx.device)[:, None]), dim=1)
            mask = torch.cat((mask, torch.ones_like(mask[:, :1])), dim=1)
        return [row[row_mask.bool()].tolist() for row, row_mask in zip(idx, mask)] if ragged else idx
