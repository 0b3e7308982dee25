"""The GPT-2 model: one dataclass config, small modules, parameter names that match the GPT-2 checkpoint.

Modelled on nanoGPT's model.py, with the two fixes that make it bit-compatible with GPT-2 /
transformers: the tanh approximation of GELU, and clear ValueErrors for user input instead of asserts.
Loading pretrained weights lives in `weights.py`; the KV-cache step used for export lives in `kv_step.py`.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn as nn
from torch.nn import functional as F


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
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        for name in ("block_size", "vocab_size", "n_layer", "n_head", "n_embd"):
            if getattr(self, name) <= 0:
                raise ValueError(f"GPTConfig.{name} must be positive, got {getattr(self, name)}")

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "GPTConfig":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


class LayerNorm(nn.Module):
    """LayerNorm with an optional bias (PyTorch's own cannot drop just the bias)."""

    def __init__(self, ndim: int, bias: bool):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(ndim))
        self.bias = nn.Parameter(torch.zeros(ndim)) if bias else None

    def forward(self, x):
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, 1e-5)


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.n_head = config.n_head
        self.n_embd = config.n_embd
        self.dropout = config.dropout

    def qkv(self, x):
        """Project to per-head (B, n_head, T, head_dim) query, key and value."""
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        # unflatten/flatten instead of view(B, T, ...): the ONNX graph then needs no shape arithmetic
        return (t.unflatten(-1, (self.n_head, -1)).transpose(1, 2) for t in (q, k, v))

    def merge_heads(self, y):
        return self.resid_dropout(self.c_proj(y.transpose(1, 2).flatten(2)))

    def forward(self, x):
        q, k, v = self.qkv(x)
        y = F.scaled_dot_product_attention(
            q, k, v, dropout_p=self.dropout if self.training else 0.0, is_causal=True
        )
        return self.merge_heads(y)


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        # GPT-2 was trained with the tanh approximation; exact GELU drifts from its checkpoints.
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x), approximate="tanh")))


class Block(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.ln_1 = LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


def as_index_tensor(idx, device=None, name: str = "idx") -> torch.Tensor:
    """Accept a LongTensor (B,T) or (T,), a list of ints or a list of equal-length lists."""
    if not isinstance(idx, torch.Tensor):
        try:
            idx = torch.tensor(idx)
        except (TypeError, ValueError) as e:
            raise ValueError(f"{name} must be token ids: a tensor, a list of ints or a list of equal-length lists ({e})") from None
    if idx.numel() == 0:
        idx = idx.long()
    if idx.dtype not in (torch.long, torch.int, torch.int32, torch.int16, torch.uint8):
        raise ValueError(f"{name} must hold integer token ids, got dtype {idx.dtype}")
    if idx.dim() == 1:
        idx = idx.unsqueeze(0)
    if idx.dim() != 2:
        raise ValueError(f"{name} must have shape (B, T) or (T,), got {tuple(idx.shape)}")
    return idx.long().to(device) if device is not None else idx.long()


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        if not isinstance(config, GPTConfig):
            raise TypeError(f"GPT expects a GPTConfig, got {type(config).__name__}")
        self.config = config
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(config.vocab_size, config.n_embd),
                wpe=nn.Embedding(config.block_size, config.n_embd),
                drop=nn.Dropout(config.dropout),
                h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
                ln_f=LayerNorm(config.n_embd, bias=config.bias),
            )
        )
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

    def check_tokens(self, idx: torch.Tensor, name: str = "idx") -> None:
        T = idx.shape[1]
        if T == 0:
            raise ValueError(f"{name} is empty: give at least one token")
        if T > self.config.block_size:
            raise ValueError(f"sequence length {T} exceeds the model's block_size {self.config.block_size}")
        lo, hi = int(idx.min()), int(idx.max())
        if lo < 0 or hi >= self.config.vocab_size:
            bad = lo if lo < 0 else hi
            raise ValueError(f"token id {bad} in {name} is outside the vocabulary [0, {self.config.vocab_size})")

    def forward(self, idx, targets=None):
        idx = as_index_tensor(idx, self.device)
        self.check_tokens(idx)
        B, T = idx.shape
        pos = torch.arange(T, dtype=torch.long, device=idx.device)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))
        for block in self.transformer.h:
            x = block(x)
        logits = self.lm_head(self.transformer.ln_f(x))
        loss = None
        if targets is not None:
            targets = as_index_tensor(targets, self.device, name="targets")
            if targets.shape != idx.shape:
                raise ValueError(f"targets shape {tuple(targets.shape)} differs from idx shape {tuple(idx.shape)}")
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1), ignore_index=-1)
        return logits, loss

    def crop_block_size(self, block_size: int) -> None:
        """Shrink the context window (e.g. load gpt2 then use 256 positions)."""
        if not 0 < block_size <= self.config.block_size:
            raise ValueError(f"block_size must be in (0, {self.config.block_size}], got {block_size}")
        self.config.block_size = block_size
        self.transformer.wpe.weight = nn.Parameter(self.transformer.wpe.weight[:block_size])

    @classmethod
    def from_pretrained(cls, name_or_path: str, override_args: dict | None = None) -> "GPT":
        """Hub names (gpt2, gpt2-medium, gpt2-large, gpt2-xl), `shakespeare`, a local HF GPT-2 directory,
        or a nanoGPT-style `.pt` checkpoint. See `gpt_export.weights`."""
        from .weights import load_pretrained

        return load_pretrained(name_or_path, override_args)

    @torch.no_grad()
    def generate(self, idx, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None,
                 top_p: float | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
        """Reference sampler: re-runs the full context each step (no cache), so it is slow but obviously right.

        temperature 0 means greedy. Returns (B, T + max_new_tokens).
        """
        from .sampling import sample_next

        idx = as_index_tensor(idx, self.device)
        self.check_tokens(idx)
        if max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
        for _ in range(max_new_tokens):
            idx_cond = idx[:, -self.config.block_size:]
            logits, _ = self(idx_cond)
            next_id = sample_next(logits[:, -1, :], temperature, top_k, top_p, generator)
            idx = torch.cat((idx, next_id), dim=1)
        return idx
