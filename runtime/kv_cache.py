"""Static KV cache bookkeeping: which slots are filled, and the attention mask the graph needs.

The buffers themselves ([B, n_head, capacity, head_dim] per layer and K/V) belong to the backend
(numpy arrays, torch tensors, GPU buffers); this class only tracks the slots, so every backend
shares the same rules. Capacity is fixed up front (prompt + max_new_tokens), as in gpt-fast.
"""

from __future__ import annotations

import numpy as np


class KVCache:
    def __init__(self, batch: int, capacity: int, storage):
        self.batch = batch
        self.capacity = capacity
        self.length = 0
        self.slot_mask = np.zeros((batch, capacity), dtype=np.int64)
        self.storage = storage

    def graph_mask(self, new_mask: np.ndarray) -> np.ndarray:
        """The graph's attention_mask: [filled cache slots | new tokens]. An empty cache is passed as past length 0."""
        if self.length == 0:
            return new_mask
        return np.concatenate([self.slot_mask, new_mask], axis=1)

    def check_room(self, new_len: int) -> None:
        if self.length + new_len > self.capacity:
            raise ValueError(f"KV cache full: {self.length} + {new_len} tokens > capacity {self.capacity}")

    def commit(self, new_mask: np.ndarray) -> None:
        n = new_mask.shape[1]
        self.slot_mask[:, self.length:self.length + n] = new_mask
        self.length += n
