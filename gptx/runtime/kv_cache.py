"""The slot KV cache: `rows` x `window` slots per layer, one row per sequence, each with its own length.

Rows [0, active) are in use and kept contiguous, so the past of a step is `buf[:active]`: a view, no copy. The
window grows in WINDOW_STEP buckets up to the context, so attention covers about the filled slots only. This is
the only place that knows the graph's cache contract (gptx/export/kv_step.py): the past is fed whole with
`attention_mask` marking filled slots, each row's position is its own length, and the new tokens' keys/values
are written at each row's own offset (by the graph itself for in-place graphs).
"""

from __future__ import annotations

import time
from typing import Callable, Sequence

import numpy as np

from .backends.base import Array, Backend
from .errors import GptxError

WINDOW_STEP = 64
# the largest cache (virtual size, 4-byte values) allocated at the whole context up front: GPT-2 124M takes
# 75 MiB a row, gpt2-xl 629 MiB; beyond this, in-place caches grow in buckets like the others
WHOLE_CONTEXT_BYTES = 1 << 30
OnStep = Callable[[str, float, int], None]  # ("prefill" | "decode", seconds, rows in the graph call)


def window_for(slots: int, max_seq: int) -> int:
    """The cache window holding `slots`: the next WINDOW_STEP bucket, capped at the context."""
    return min(-(-max(slots, 1) // WINDOW_STEP) * WINDOW_STEP, max_seq)


def first_window(slots: int, max_seq: int, writes_cache: bool, rows: int, n_layer: int, n_embd: int) -> int:
    """The window a cache of `rows` rows starts with, holding `slots`. Growing reallocates and copies every layer
    while GroupQueryAttention runs no slower over a whole-context buffer (docs/experiments.md), so in-place graphs
    take the whole context at once when its virtual size fits WHOLE_CONTEXT_BYTES (only written pages are resident)."""
    if writes_cache and 2 * n_layer * rows * max_seq * n_embd * 4 <= WHOLE_CONTEXT_BYTES:
        return max_seq
    return window_for(slots, max_seq)


def _every(rows: int, width: int, every_position: bool) -> dict:
    """backend.run's logits_index for every new position of each row, when asked (else the last one's only)."""
    return {"logits_index": np.broadcast_to(np.arange(width, dtype=np.int64), (rows, width))} if every_position else {}


def pad(prompts: Sequence[Sequence[int]], pad_id: int, left: bool) -> tuple[np.ndarray, np.ndarray]:
    """(ids, mask) of shape (B, longest prompt); shorter prompts are padded on the left or on the right."""
    longest = max(len(p) for p in prompts)
    ids = np.full((len(prompts), longest), pad_id, dtype=np.int64)
    mask = np.zeros((len(prompts), longest), dtype=np.int64)
    for row, prompt in enumerate(prompts):
        at = slice(longest - len(prompt), longest) if left else slice(0, len(prompt))
        ids[row, at] = prompt
        mask[row, at] = 1
    return ids, mask


class KVCache:
    """rows x window slots per layer; row r holds lengths[r] tokens at [0, lengths[r]); rows [0, active) in use."""

    def __init__(self, backend: Backend, rows: int, window: int = WINDOW_STEP, pad_id: int = 0,
                 on_step: OnStep | None = None):
        self.backend = backend
        self.on_step = on_step  # timing hook for benchmarks: each prefill / decode, cache writes included
        self.rows = rows
        self.max_seq = backend.capabilities.max_seq
        self.pad_id = pad_id
        self.lengths = np.zeros(rows, dtype=np.int64)
        self.active = 0
        self.window = 0
        self.buffers: list[Array] = []
        self._handed: list[Array] = []  # the cache views last handed to the backend
        self._row_index = np.arange(rows)
        self._resize(first_window(window, self.max_seq, backend.capabilities.writes_cache, rows, backend.n_layer,
                                  backend.n_head * backend.head_dim))

    # ------------------------------------------------------------------------------------------ rows
    def claim(self) -> int:
        """The next free row (always `active`, so the active rows stay contiguous)."""
        if self.active == self.rows:
            raise GptxError(f"all {self.rows} cache rows are in use")
        row = self.active
        self.lengths[row] = 0
        self._mask[row, : self.window] = 0
        self.active += 1
        return row

    def free(self, row: int) -> int | None:
        """Release `row`; the last active row moves into it (one row copied per buffer, never the whole cache).
        Returns the old index of the row that moved, or None when `row` was the last one."""
        if not 0 <= row < self.active:
            raise IndexError(f"row {row} is not active (active rows: {self.active})")
        last = self.active - 1
        self.active = last
        if row == last:
            return None
        self.copy_row(last, row)
        return last

    # ------------------------------------------------------------------------------------------ steps
    def prefill(self, rows: Sequence[int], prompts: Sequence[Sequence[int]], every_position: bool = False):
        """Run the prompts of (claimed, empty) `rows` in one graph call; (k, V) last-position logits, or with
        `every_position` a list of (len_i, V) logits (scoring a prompt). Left-padded over an empty past (TensorRT:
        `min_past` masked dummy slots), real keys/values then copied into slots [0, len); in-place graphs run
        right-padded over the rows' own buffers when they are one contiguous block, else one row at a time."""
        start = time.perf_counter()
        lens = np.array([len(p) for p in prompts], dtype=np.int64)
        if lens.min(initial=1) < 1:
            raise GptxError("every prompt needs at least one token")
        if lens.max() > self.max_seq:
            raise GptxError(f"a prompt of {lens.max()} tokens exceeds the context of {self.max_seq}")
        self._grow_to(int(lens.max()))
        in_place, first = self.backend.capabilities.writes_cache, int(rows[0])
        if in_place and list(rows) != list(range(first, first + len(rows))):
            parts = [self.prefill([r], [p], every_position) for r, p in zip(rows, prompts)]
            return [x for part in parts for x in part] if every_position else np.concatenate(parts)
        ids, mask = pad(prompts, self.pad_id, left=not in_place)
        k, width = ids.shape
        if in_place:
            positions = np.broadcast_to(np.arange(width, dtype=np.int64), (k, width))
            past = self._handed = [buf[first:first + k] for buf in self.buffers]
        else:
            positions = np.clip(np.cumsum(mask, axis=1) - 1, 0, None)
            min_past = self.backend.capabilities.min_past
            past = self.backend.allocate(k, min_past)
            if min_past:
                mask = np.concatenate([np.zeros((k, min_past), np.int64), mask], axis=1)
        logits, presents = self.backend.run(ids, mask, positions, past, **_every(k, width, every_position))
        if not in_place:
            # row i's slots [0, len_i) <- its real tokens, the last len_i present positions: one slice copy per row
            # and buffer (5x faster than one fancy-indexed scatter per buffer: 2 vs 11 ms for a 512-token prompt)
            for buf, new in zip(self.buffers, presents):
                for i, (row, n) in enumerate(zip(rows, lens.tolist())):
                    buf[row, :, :n] = new[i, :, width - n:]
        rows = np.asarray(rows, dtype=np.int64)
        self.lengths[rows] = lens
        self._mask[rows, : self.window] = np.arange(self.window)[None, :] < lens[:, None]
        self._report("prefill", start, k)
        if every_position:  # row i's real positions: its first len_i (right-padded) or its last (left-padded)
            return [logits[i, :n] if in_place else logits[i, width - n:] for i, n in enumerate(lens.tolist())]
        return logits

    def extend(self, row: int, tokens: Sequence[int], every_position: bool = False):
        """Append `tokens` (a prompt chunk) to `row`: one graph call over the row's filled slots; (1, V) logits of
        the last one, or with `every_position` [(T, V)]. An empty row takes the `prefill` path (`min_past`)."""
        start_len = int(self.lengths[row])
        if start_len == 0:
            return self.prefill([row], [tokens], every_position)
        start = time.perf_counter()
        new = len(tokens)
        end = start_len + new
        if end > self.max_seq:
            raise GptxError(f"{end} tokens exceed the context of {self.max_seq}")
        self._grow_to(end)
        ids = np.asarray(tokens, dtype=np.int64).reshape(1, new)
        positions = np.arange(start_len, end, dtype=np.int64)[None, :]
        past = [buf[row:row + 1] for buf in self.buffers]
        if self.backend.capabilities.writes_cache:  # rows are prefixes: the mask covers the filled slots + new
            self._handed = past
            logits, _ = self.backend.run(ids, np.ones((1, end), np.int64), positions, past,
                                         **_every(1, new, every_position))
        else:
            mask = np.concatenate([self._mask[row:row + 1, : self.window], np.ones((1, new), np.int64)], axis=1)
            logits, presents = self.backend.run(ids, mask, positions, past, **_every(1, new, every_position))
            for buf, kv in zip(self.buffers, presents):
                buf[row, :, start_len:end] = kv[0]
        self.lengths[row] = end
        self._mask[row, start_len:end] = 1
        self._report("prefill", start, 1)
        return [logits[0]] if every_position else logits

    def copy_row(self, source: int, target: int) -> None:
        """Make row `target` hold what `source` holds (sibling samples of one prompt share its prefill this way)."""
        filled = int(self.lengths[source])
        for buf in self.buffers:  # only the filled slots: the rest of a whole-context row is unwritten pages
            buf[target, :, :filled] = buf[source, :, :filled]
        self.lengths[target] = filled
        self._mask[target] = self._mask[source]

    def reserve(self, slots: int) -> None:
        """Grow the window to hold `slots` now: a prompt in chunks then costs one reallocation, not one per bucket."""
        self._grow_to(min(slots, self.max_seq))

    def read(self, row: int, start: int, end: int) -> np.ndarray:
        """A host copy of slots [start, end) of `row`: [2 * n_layer, n_head, end - start, head_dim]."""
        return np.stack([np.asarray(buf[row, :, start:end]) for buf in self.buffers])

    def write(self, row: int, blocks: Sequence[np.ndarray]) -> None:
        """Fill an empty row with `blocks` (from `read`, one after another from slot 0): it then holds them."""
        slots = sum(b.shape[2] for b in blocks)
        if slots > self.max_seq:
            raise GptxError(f"{slots} cached tokens exceed the context of {self.max_seq}")
        self._grow_to(slots)
        at = 0
        for block in blocks:
            n = block.shape[2]
            for buf, kv in zip(self.buffers, block):
                buf[row, :, at:at + n] = kv
            at += n
        self.lengths[row] = slots
        self._mask[row, :slots] = 1

    def decode(self, tokens: np.ndarray, live: np.ndarray | None = None) -> np.ndarray:
        """One token for every active row (tokens: (active,)); (active, V) logits. `live` (bool, (active,)): only
        those rows take the token; the others (rows still being prefilled) ride along, their logits unused and
        their length unchanged (an in-place graph writes their slot `length`, which their next chunk overwrites)."""
        start = time.perf_counter()
        a = self.active
        lengths = self.lengths[:a]
        longest = int(lengths.max())
        if longest >= self.window:
            if longest >= self.max_seq:
                raise GptxError(f"a row is full: {longest} tokens fill the context of {self.max_seq}")
            self._grow_to(longest + 1)
        if self._views is None or len(self._views[0]) != a:
            self._views = self._handed = [buf[:a] for buf in self.buffers]
        ids = np.asarray(tokens, dtype=np.int64).reshape(a, 1)
        logits, presents = self.backend.run(ids, self._mask[:a], lengths[:, None], self._views)
        every = live is None or bool(live.all())
        if self.backend.capabilities.writes_cache:  # the graph wrote slot lengths[r] of each row itself
            rows = self._row_index[:a] if every else np.flatnonzero(live)
            self._mask[rows, lengths[rows]] = 1
        elif every and (a == 1 or lengths[0] == lengths[-1] and (lengths == lengths[0]).all()):
            slot = int(lengths[0])  # one slot column for every row: a plain slice, ~4x cheaper than indexing
            for buf, new in zip(self.buffers, presents):
                buf[:a, :, slot:slot + 1] = new
            self._mask[:a, slot] = 1
            rows = slice(0, a)
        else:
            rows = self._row_index[:a] if every else np.flatnonzero(live)
            for buf, new in zip(self.buffers, presents):
                buf[rows, :, lengths[rows]] = new[rows, :, 0]
            self._mask[rows, lengths[rows]] = 1
        lengths[rows] += 1
        self._report("decode", start, a)
        return logits

    def _report(self, kind: str, start: float, rows: int) -> None:
        if self.on_step is not None:
            self.on_step(kind, time.perf_counter() - start, rows)

    # ------------------------------------------------------------------------------------------ window
    def _grow_to(self, slots: int) -> None:
        if slots > self.window:
            self._resize(slots)

    def _resize(self, slots: int) -> None:
        """Reallocate to the next WINDOW_STEP bucket holding `slots` (capped at the context); copy active rows."""
        window = window_for(slots, self.max_seq)
        old, old_window, a = self.buffers, self.window, self.active
        self._handed.clear()  # the backend may hold the last views it got (InPlaceBinding): let go of them
        self.buffers = self.backend.allocate(self.rows, window)
        for i, prev in enumerate(old):
            self.buffers[i][:a, :, :old_window] = prev[:a]
            old[i] = prev = None  # each old layer goes once copied: growth holds one layer twice, not all
        mask = np.zeros((self.rows, window + 1), dtype=np.int64)
        mask[:, window] = 1  # the column of the token being decoded
        if old_window:
            mask[:a, :old_window] = self._mask[:a, :old_window]
        self._mask, self.window, self._views = mask, window, None
