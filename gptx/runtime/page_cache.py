"""Page-cache advice for the weights file ONNX Runtime maps: hints to the kernel that keep resident memory down.

Neither changes a byte on disk or in the data; both are no-ops where the OS lacks the call.
"""

from __future__ import annotations

import ctypes
import os
import sys
from pathlib import Path


def drop_cached_pages(path: Path) -> None:
    """Ask the kernel to evict a file's unmapped pages from the page cache (a hint: nothing on disk changes, and
    pages another process maps stay). Why: pages that a read() brought in (a checksum, a copy, the export's own
    write) sit in the cache as large folios, and a process that maps the file (ONNX Runtime maps external
    weights) gets a whole folio resident for each row it gathers. Measured on the GPT-2 int4 export (Linux 6.18,
    ext4, 8 MB readahead): 48 token lookups made 37 MiB of the file resident beyond what loading touched when
    it came from such a cache, 6 MiB when its pages were faulted in from disk; decode peak RSS 251 vs 222 MiB."""
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


MADV_RANDOM = 1  # Linux's madvise advice: no readahead around a fault in these pages


def advise_random_access(path: Path) -> int:
    """Tell the kernel that this process reads its mappings of `path` at random (MADV_RANDOM, a hint: nothing
    changes on disk or in the data), so a page fault there brings in that page, not a readahead window around it.
    Returns how many mapped ranges took the advice (0 where there is no /proc/self/maps or no madvise).

    Why (hand-written: neither the mmap module nor ONNX Runtime can advise a mapping ONNX Runtime made): after
    loading, the only reads of the weights file's pages are rows gathered by token id, the token lookup and the
    int4 head's exact re-score (gptx.export.optimize.rescore_head). Each miss otherwise reads a readahead window,
    and the mapping then makes its neighbours resident too: on GPT-2 int4 (Linux 6.18, ext4, 8 MB readahead),
    128 decode tokens with 64 re-scored rows each peaked at 279 MiB RSS, 197 MiB with this advice, for about
    50 ms more on the first 128 tokens (benchmarks/README.md)."""
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
    if not ranges:
        return 0
    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    return sum(libc.madvise(start, length, MADV_RANDOM) == 0 for start, length in ranges)
