"""The one small interface every engine implements, so generation, sampling and tests don't care which runs."""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path

import numpy as np

from ..kv_cache import KVCache


class Backend(ABC):
    name: str = "?"

    def __init__(self, manifest: dict, directory: Path | None, device: str = "cpu"):
        self.manifest = manifest
        self.directory = directory
        self.device = device
        cfg = manifest["config"]
        self.n_layer, self.n_head, self.head_dim = cfg["n_layer"], cfg["n_head"], cfg["n_embd"] // cfg["n_head"]
        self.block_size = cfg["block_size"]

    @abstractmethod
    def allocate(self, batch: int, capacity: int):
        """Cache storage for 2 * n_layer tensors of [batch, n_head, capacity, head_dim]."""

    @abstractmethod
    def run(self, input_ids: np.ndarray, attention_mask: np.ndarray, position_ids: np.ndarray,
            cache: KVCache) -> np.ndarray:
        """One graph call; writes the new keys/values into cache slots [cache.length, +T); returns (B, V) fp32 logits."""

    def new_cache(self, batch: int, capacity: int) -> KVCache:
        if capacity > self.block_size:
            raise ValueError(f"cache capacity {capacity} exceeds the model's block size {self.block_size}")
        return KVCache(batch, capacity, self.allocate(batch, capacity))

    def step(self, input_ids: np.ndarray, position_ids: np.ndarray, new_mask: np.ndarray, cache: KVCache) -> np.ndarray:
        """Prefill (empty cache) or decode: run the new tokens and append them to the cache."""
        cache.check_room(input_ids.shape[1])
        logits = self.run(input_ids, cache.graph_mask(new_mask), position_ids, cache)
        cache.commit(new_mask)
        return logits

    def describe(self) -> str:
        return f"{self.name} on {self.device}"
