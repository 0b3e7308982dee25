"""Page-cache advice for the weights file ONNX Runtime maps: hints to the kernel that keep resident memory down.

Neither changes a byte on disk or in the data; both are no-ops where the OS lacks the call. Measurements:
docs/experiments.md ("evicts the weights file's cached pages", "without readahead once loaded").
"""

from __future__ import annotations

import ctypes
import os
import sys
from pathlib import Path

MADV_RANDOM = 1  # Linux's madvise advice: no readahead around a fault in these pages


def drop_cached_pages(path: Path) -> None:
    """Ask the kernel to evict a file's unmapped pages from the page cache (pages another process maps stay).
    Why: pages a read() brought in (a checksum, a copy) sit in the cache as large folios, and a process that maps
    the file (ONNX Runtime maps external weights) then gets a whole folio resident for each row it gathers."""
    if not hasattr(os, "posix_fadvise"):
        return
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return  # the caller's own open reports a missing or unreadable file in its own words
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def advise_random_access(path: Path) -> int:
    """Tell the kernel that this process reads its mappings of `path` at random (MADV_RANDOM), so a page fault
    there brings in that page, not a readahead window whose neighbours the mapping then keeps resident. After
    loading, the weights are read only by token id (the lookup, the int4 head's re-score). Returns how many mapped
    ranges took the advice. Hand-written: neither mmap nor ONNX Runtime can advise a mapping ONNX Runtime made."""
    if not sys.platform.startswith("linux"):
        return 0
    target = str(Path(path).resolve())
    ranges = []
    try:
        with open("/proc/self/maps") as maps:
            for line in maps:
                fields = line.split(maxsplit=5)
                if len(fields) == 6 and fields[5].rstrip("\n") == target:
                    lo, hi = (int(x, 16) for x in fields[0].split("-"))
                    ranges.append((lo, hi - lo))
    except OSError:
        return 0
    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    return sum(libc.madvise(start, length, MADV_RANDOM) == 0 for start, length in ranges)
