"""Prefix reuse: the keys/values of prompt blocks already computed, kept in host memory for the next prompt
that starts with the same tokens (vLLM's automatic prefix caching, in its simplest form).

Block i's key hashes block i-1's key and block i's tokens, so a key names the whole prefix up to its block; the
chain starts at the export's identity, so one export's keys/values are never served to another. Blocks are copied
into a row, never shared in place, so a reused prefix gives exactly the keys/values the row would have computed.
Memory is bounded (`capacity_bytes`), least recently used out.
"""

from __future__ import annotations

import hashlib
import json
from collections import OrderedDict
from typing import Callable, Sequence

import numpy as np

BLOCK_TOKENS = 32


def export_identity(manifest: dict) -> bytes:
    """A digest of the manifest: another export (other weights, dtype, graph) gives another chain root."""
    return hashlib.blake2b(json.dumps(manifest, sort_keys=True, default=str).encode(), digest_size=16).digest()


class PrefixCache:
    """Blocks of keys/values ([2 * n_layer, n_head, BLOCK_TOKENS, head_dim] each) keyed by the hash chain."""

    def __init__(self, capacity_bytes: int, root: bytes, block_tokens: int = BLOCK_TOKENS):
        self.capacity_bytes = capacity_bytes
        self.block_tokens = block_tokens
        self.root = root
        self.bytes = 0
        self._blocks: OrderedDict[bytes, np.ndarray] = OrderedDict()

    def __len__(self) -> int:
        return len(self._blocks)

    def keys(self, tokens: Sequence[int], limit: int) -> list[bytes]:
        """The chain keys of the full blocks within the first `limit` tokens."""
        keys, parent, b = [], self.root, self.block_tokens
        ids = np.asarray(tokens[: limit - limit % b], dtype=np.int64)
        for start in range(0, len(ids), b):
            parent = hashlib.blake2b(parent + ids[start:start + b].tobytes(), digest_size=16).digest()
            keys.append(parent)
        return keys

    def match(self, tokens: Sequence[int], limit: int) -> list[np.ndarray]:
        """The cached blocks that start `tokens`, within its first `limit` tokens (marked recently used)."""
        found = []
        for key in self.keys(tokens, limit):
            block = self._blocks.get(key)
            if block is None:
                break
            self._blocks.move_to_end(key)
            found.append(block)
        return found

    def store(self, tokens: Sequence[int], read: Callable[[int, int], np.ndarray], first_block: int = 0) -> None:
        """Keep the full blocks of `tokens` not cached yet, from block `first_block` on (the earlier ones were
        offered before); `read(start, end)` gives their keys/values."""
        b = self.block_tokens
        for i, key in enumerate(self.keys(tokens, len(tokens))[first_block:], first_block):
            if key in self._blocks:
                self._blocks.move_to_end(key)
                continue
            block = read(i * b, (i + 1) * b)
            if block.nbytes > self.capacity_bytes:
                return
            while self.bytes + block.nbytes > self.capacity_bytes:
                self.bytes -= self._blocks.popitem(last=False)[1].nbytes
            self._blocks[key] = block
            self.bytes += block.nbytes
