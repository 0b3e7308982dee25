"""The one small, typed interface every engine implements: allocate cache buffers, run the graph once.

Backends hold no cache bookkeeping: which slots are filled, where new keys/values go and the empty-past
special case of prefill live once, in `gptx/runtime/kv_cache.py`. A backend only says what it can do
(`Capabilities`), makes zeroed buffers in its native array type and runs one graph call.
"""

from __future__ import annotations

import importlib.util
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar, Sequence, Union

import numpy as np

from ..errors import GptxError
from ..io_names import ATTENTION_MASK, INPUT_IDS, LOGITS_INDEX, POSITION_IDS, past_names, present_names

if TYPE_CHECKING:
    import torch

# numpy-style indexing (slices, integer arrays) works on both; a backend returns its native type
Array = Union[np.ndarray, "torch.Tensor"]


@dataclass(frozen=True)
class Capabilities:
    max_batch: int | None       # rows one call may take; None = bounded by memory only (ONNX Runtime, torch)
    max_seq: int                # positions: the model's block_size, or a TensorRT engine's --max-seq
    min_past: int = 0           # smallest past a call takes (TensorRT: 1); kv_cache.py adds masked dummy slots
    writes_cache: bool = False  # the graph writes `past` itself (`in_place`): no presents, rows are prefixes
    any_logits: bool = False    # `run` takes logits_index (echo, prompt logprobs); older exports: last position only


def last_positions(attention_mask: np.ndarray, new_len: int, writes_cache: bool) -> np.ndarray:
    """[B, 1] logits_index of each row's last real new position: the last column (prompts are left-padded, or
    one new token), or, for in-place graphs' right-padded prefill, the row's length - 1."""
    rows = len(attention_mask)
    if new_len == 1 or not writes_cache:
        return np.full((rows, 1), new_len - 1, dtype=np.int64)
    return np.minimum(attention_mask.sum(axis=1) - 1, new_len - 1).astype(np.int64).reshape(rows, 1)


class Backend(ABC):
    name: ClassVar[str] = "?"
    requires: ClassVar[str]      # the package it runs on, as imported: `available` looks for it without importing it
    install_hint: ClassVar[str]  # how to install that package
    capabilities: Capabilities

    def __init__(self, manifest: dict, directory: Path | None, device: str = "cpu"):
        self.manifest, self.directory, self.device = manifest, directory, device
        cfg = manifest["config"]
        self.n_layer, self.n_head, self.head_dim = cfg["n_layer"], cfg["n_head"], cfg["n_embd"] // cfg["n_head"]
        self.block_size = cfg["block_size"]
        self.past_names, self.present_names = past_names(self.n_layer), present_names(self.n_layer)

    @classmethod
    def available(cls) -> bool:
        return importlib.util.find_spec(cls.requires) is not None

    @abstractmethod
    def allocate(self, rows: int, window: int) -> list[Array]:
        """2 * n_layer zeroed buffers [rows, n_head, window, head_dim] (key, value per layer, layer-major)."""

    @abstractmethod
    def run(self, input_ids: np.ndarray, attention_mask: np.ndarray, position_ids: np.ndarray,
            past: Sequence[Array], logits_index: np.ndarray | None = None) -> tuple[np.ndarray, list[Array]]:
        """One graph call, nothing else: float32 numpy logits and the presents (the new tokens' keys/values,
        [B, n_head, T, head_dim], native arrays). Logits are (B, V) for each row's last real position when
        `logits_index` is None, else (B, K, V) for the positions its [B, K] indices name (needs `any_logits`).
        Never writes the cache, except with `capabilities.writes_cache` (then presents is [])."""

    def graph_inputs(self, input_ids: np.ndarray, attention_mask: np.ndarray, position_ids: np.ndarray,
                     logits_index: np.ndarray | None) -> dict[str, np.ndarray]:
        """The graph's inputs but the cache, by name: logits_index defaults to each row's last real position;
        exports that predate it (last position only) refuse one."""
        inputs = {INPUT_IDS: input_ids, ATTENTION_MASK: attention_mask, POSITION_IDS: position_ids}
        if self.capabilities.any_logits:
            inputs[LOGITS_INDEX] = last_positions(attention_mask, input_ids.shape[1], self.capabilities.writes_cache) \
                if logits_index is None else logits_index
        elif logits_index is not None:
            raise GptxError(f"{self.directory} returns the last position's logits only (exported before "
                            "logits_index): re-export it with this gptx to use echo or prompt logprobs")
        return inputs

    def describe(self) -> str:
        return f"{self.name} on {self.device}"
