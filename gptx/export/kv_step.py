"""One forward step with a KV cache: the module that is exported to ONNX and that the `torch` backend runs.

The same graph serves prefill (past length 0) and decode. Its contract (names from `gptx.runtime.io_names`):
  inputs   input_ids [B, T], attention_mask [B, P + T], position_ids [B, T] (int64),
           logits_index [B, K] int64 (which of the T new positions get logits, per row: a step asks for its last,
           scoring a prompt for all), past_key_values.{i}.key / .value [B, n_head, P, head_dim]
  outputs  logits [B, K, vocab] float32, present.{i}.key / .value [B, n_head, T, head_dim]: the *new* tokens only.

Returning only the new keys/values lets the runtime keep a preallocated cache and write each step into it in place:
the graph never copies the past, which may be the whole buffer (`attention_mask[:, :P]` marks its filled slots).
The transformer is the model's own (`GPT.body`); this module adds only the contract and the fp16 islands.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from gptx.model.gpt import GPT, CausalSelfAttention, attention_allowed, cast_to

__all__ = ["KVStep"]


class KeepLeadingReshape(torch.autograd.Function):
    """Reshape the trailing dims and keep (batch, seq): exported as Reshape(x, [0, 0, *tail]). By hand because the
    tracer turns `view(B, T, H, D)` into Shape/Gather/Slice/Concat per reshape (~300 extra nodes for GPT-2), and on
    CPU each node costs dispatch time at every decode step. Used only while exporting (no backward)."""

    @staticmethod
    def forward(ctx, x, tail: tuple[int, ...]):
        return x.reshape(x.shape[0], x.shape[1], *tail)

    @staticmethod
    def symbolic(g, x, tail: tuple[int, ...]):
        shape = g.op("Constant", value_t=torch.tensor([0, 0, *tail], dtype=torch.int64))
        return g.op("Reshape", x, shape)


def reshape_tail(x: torch.Tensor, tail: tuple[int, ...]) -> torch.Tensor:
    """The attention's head reshape for KVStep: KeepLeadingReshape while exporting, the model's own otherwise."""
    if torch.onnx.is_in_onnx_export():
        return KeepLeadingReshape.apply(x, tail)
    return CausalSelfAttention.reshape_tail(x, tail)


def attention_bias(allowed: torch.Tensor) -> torch.Tensor:
    """(B, 1, T, S) float32: 0 where `allowed`, -inf elsewhere; built once per step, added in every layer (same
    numbers as a masked_fill per layer, whose broadcast Where ONNX Runtime runs scalar and single-threaded: 12 ms
    against 0.4 ms for the Add on 12 x 512 x 512 scores, 10% of a 512-token prefill)."""
    zero, minus_inf = (torch.tensor(v, dtype=torch.float32, device=allowed.device) for v in (0.0, float("-inf")))
    return torch.where(allowed, zero, minus_inf)


class KVStep(nn.Module):
    """Wraps a GPT (sharing its weights) with the cache contract above. With `half=True` the matrices run in fp16
    while the residual stream, LayerNorms, softmax and the logits stay fp32 (GPT-2's residual stream overflows fp16).
    Converts the GPT in place and gives its attention modules `reshape_tail`: export passes a copy."""

    def __init__(self, gpt: GPT, half: bool = False):
        super().__init__()
        self.gpt = gpt
        self.compute_dtype = torch.float16 if half else torch.float32
        for block in gpt.transformer.h:
            block.attn.reshape_tail = reshape_tail
            if half:
                block.attn.half()
                block.mlp.half()
        if half:
            gpt.lm_head.half()  # tied: wte becomes fp16 too
            gpt.transformer.wpe.float()

    def forward(self, input_ids, attention_mask, position_ids, logits_index, *past):
        past_len, new_len = past[0].shape[2], input_ids.shape[1]
        bias = attention_bias(attention_allowed(attention_mask, past_len, new_len))
        x, presents = self.gpt.body(input_ids, position_ids, bias, list(zip(past[0::2], past[1::2])))
        head = self.gpt.lm_head
        batch, count = logits_index.shape
        # the asked-for positions (a Tile, not expand: the exporter turns expand into a Where); ln_f and the head
        # then run on [B * K, n_embd], 2-D as the tied head's Gemm (convert.py) needs
        picked = torch.gather(x, 1, logits_index.unsqueeze(-1).repeat(1, 1, x.shape[-1])).reshape(-1, x.shape[-1])
        hidden = cast_to(self.gpt.transformer.ln_f(picked), head.weight.dtype)
        logits = cast_to(head(hidden), torch.float32).reshape(batch, count, head.weight.shape[0])
        return (logits, *(t for kv in presents for t in kv))

    def example_inputs(self, batch: int = 2, new_len: int = 3, past_len: int = 4):
        """Tracing inputs: a nonzero past so nothing about it is constant-folded."""
        cfg = self.gpt.config
        device = self.gpt.device
        ids = torch.randint(0, cfg.vocab_size, (batch, new_len), device=device)
        mask = torch.ones(batch, past_len + new_len, dtype=torch.long, device=device)
        pos = torch.arange(past_len, past_len + new_len, device=device).expand(batch, -1).contiguous()
        index = torch.full((batch, 1), new_len - 1, dtype=torch.long, device=device)
        shape = (batch, cfg.n_head, past_len, cfg.head_dim)
        past = [torch.zeros(shape, dtype=self.compute_dtype, device=device) for _ in range(2 * cfg.n_layer)]
        return (ids, mask, pos, index, *past)
