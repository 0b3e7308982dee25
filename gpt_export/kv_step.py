"""One forward step with a KV cache: the module that is exported to ONNX and that the `torch` backend runs.

The same graph serves prefill (past length 0) and decode. Its contract:
  inputs   input_ids [B, T] int64, attention_mask [B, P + T] int64, position_ids [B, T] int64,
           past_key_values.{i}.key / .value [B, n_head, P, head_dim]
  outputs  logits [B, vocab] (last position only: prefill does not pay for logits nobody reads),
           present.{i}.key / .value [B, n_head, T, head_dim]: the keys/values of the *new* tokens only.

Returning only the new keys/values (rather than concat(past, new)) is what lets the runtime keep a
preallocated cache and write each step into it in place: the graph never copies the past. The past may
be the whole preallocated buffer; `attention_mask[:, :P]` marks which of its slots are filled.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
from torch.nn import functional as F

from .model import GPT


def input_names(n_layer: int) -> list[str]:
    names = ["input_ids", "attention_mask", "position_ids"]
    for i in range(n_layer):
        names += [f"past_key_values.{i}.key", f"past_key_values.{i}.value"]
    return names


def output_names(n_layer: int) -> list[str]:
    names = ["logits"]
    for i in range(n_layer):
        names += [f"present.{i}.key", f"present.{i}.value"]
    return names


class KeepLeadingReshape(torch.autograd.Function):
    """Reshape the trailing dims and keep (batch, seq): exported as Reshape(x, [0, 0, *tail]).

    Written by hand because the tracer turns `view(B, T, H, D)` into Shape/Gather/Slice/Concat
    arithmetic per reshape (~300 extra nodes for GPT-2), and on CPU each node costs dispatch time
    at every decode step. Inference only (no backward).
    """

    @staticmethod
    def forward(ctx, x, head_dim: int):
        tail = (-1, head_dim) if head_dim else (-1,)
        return x.reshape(x.shape[0], x.shape[1], *tail)

    @staticmethod
    def symbolic(g, x, head_dim: int):
        tail = [-1, head_dim] if head_dim else [-1]
        shape = g.op("Constant", value_t=torch.tensor([0, 0, *tail], dtype=torch.int64))
        return g.op("Reshape", x, shape)


def split_heads(x, head_dim: int):
    """(B, T, C) -> (B, n_head, T, head_dim)."""
    return KeepLeadingReshape.apply(x, head_dim).transpose(1, 2)


def merge_heads(y):
    """(B, n_head, T, head_dim) -> (B, T, C)."""
    return KeepLeadingReshape.apply(y.transpose(1, 2), 0)


def attention_allowed(attention_mask: torch.Tensor, past_len, new_len) -> torch.Tensor:
    """(B, 1, T, P+T) bool: slot j is visible to new token i if it is filled and not in its future.

    Each token always sees itself, so a left-padding row never has an all-masked softmax (which would
    produce NaN that then leaks into the cache).
    """
    device = attention_mask.device
    j = torch.arange(past_len + new_len, device=device)[None, :]
    i = torch.arange(new_len, device=device)[:, None] + past_len
    filled = attention_mask[:, None, None, :].bool()
    return (filled & (j <= i)) | (j == i)


def cached_attention(q, k, v, past_k, past_v, allowed):
    """Softmax over [past | new] without concatenating the cache: two score blocks, two value products."""
    scale = 1.0 / math.sqrt(q.shape[-1])
    scores = torch.cat([q @ past_k.transpose(-1, -2), q @ k.transpose(-1, -2)], dim=-1) * scale
    if q.dtype != torch.float32:  # accumulate the softmax in fp32 even for fp16 exports
        scores = scores.float()
    probs = torch.softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1).to(q.dtype)
    past_len = past_k.shape[2]
    return probs[..., :past_len] @ past_v + probs[..., past_len:] @ v


class KVStep(nn.Module):
    """Wraps a GPT (sharing its weights) with the cache contract above.

    With `half=True` the matrices run in fp16 while the residual stream, LayerNorms, softmax and the
    logits stay fp32: GPT-2 overflows fp16 in its residual stream without that care.
    """

    def __init__(self, gpt: GPT, half: bool = False):
        super().__init__()
        self.gpt = gpt
        self.compute_dtype = torch.float16 if half else torch.float32
        if half:
            for block in gpt.transformer.h:
                block.attn.half()
                block.mlp.half()
            gpt.lm_head.half()  # tied: wte becomes fp16 too
            gpt.transformer.wpe.float()

    @property
    def n_layer(self) -> int:
        return self.gpt.config.n_layer

    @property
    def half(self) -> bool:
        return self.compute_dtype == torch.float16

    def ln(self, layer_norm, x):
        return layer_norm(x).to(self.compute_dtype) if self.half else layer_norm(x)

    def to_fp32(self, x):
        """Casts only in fp16 mode: in fp32 a no-op cast would still be traced and block ORT's fusions."""
        return x.float() if self.half else x

    def forward(self, input_ids, attention_mask, position_ids, *past):
        tr = self.gpt.transformer
        past_len, new_len = past[0].shape[2], input_ids.shape[1]
        allowed = attention_allowed(attention_mask, past_len, new_len)
        x = self.to_fp32(tr.wte(input_ids)) + tr.wpe(position_ids)
        presents = []
        for i, block in enumerate(tr.h):
            attn = block.attn
            qkv = attn.c_attn(self.ln(block.ln_1, x)).split(attn.n_embd, dim=2)
            q, k, v = (split_heads(t, attn.n_embd // attn.n_head) for t in qkv)
            y = cached_attention(q, k, v, past[2 * i], past[2 * i + 1], allowed)
            x = x + self.to_fp32(attn.c_proj(merge_heads(y)))
            x = x + self.to_fp32(block.mlp(self.ln(block.ln_2, x)))
            presents += [k, v]
        last = self.ln(tr.ln_f, x[:, -1, :])
        logits = self.to_fp32(F.linear(last, self.gpt.lm_head.weight))
        return (logits, *presents)

    def example_inputs(self, batch: int = 2, new_len: int = 3, past_len: int = 4):
        """Tracing inputs: a nonzero past so nothing about it is constant-folded."""
        cfg = self.gpt.config
        device = self.gpt.device
        ids = torch.randint(0, cfg.vocab_size, (batch, new_len), device=device)
        mask = torch.ones(batch, past_len + new_len, dtype=torch.long, device=device)
        pos = torch.arange(past_len, past_len + new_len, device=device).expand(batch, -1).contiguous()
        shape = (batch, cfg.n_head, past_len, cfg.head_dim)
        past = [torch.zeros(shape, dtype=self.compute_dtype, device=device) for _ in range(2 * cfg.n_layer)]
        return (ids, mask, pos, *past)
