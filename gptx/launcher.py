"""The `gptx` command's entry point: settle the process environment, then run the CLI (gptx/cli.py).

A decode step streams every weight once; glibc's malloc, started with GLIBC_TUNABLES=glibc.malloc.hugetlb=1
(glibc >= 2.35), backs the large blocks ONNX Runtime packs the weights into with 2 MiB transparent huge pages,
which saves page-table walks (docs/experiments.md). glibc reads tunables only at process start, so the command
executes itself again, once, with the tunable added (GPTX_HUGE_PAGES=0 opts out). Stdlib only and imported first,
so that costs a bare interpreter start (40 ms), not the CLI's imports (0.3 s).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from pathlib import Path

TUNABLE = "glibc.malloc.hugetlb=1"
OPT_OUT = "GPTX_HUGE_PAGES"  # "0": never re-execute
THP_ENABLED = Path("/sys/kernel/mm/transparent_hugepage/enabled")
MIN_GLIBC = (2, 35)  # the first glibc with glibc.malloc.hugetlb


def glibc_version() -> tuple[int, int] | None:
    """(major, minor) of the C library when it is glibc, else None (musl, macOS, Windows)."""
    try:
        name, version = os.confstr("CS_GNU_LIBC_VERSION").split()
        return (int(version.split(".")[0]), int(version.split(".")[1])) if name == "glibc" else None
    except (AttributeError, ValueError, OSError, IndexError):
        return None


def thp_mode() -> str | None:
    """The kernel's transparent huge page mode ("always", "madvise" or "never"); None when unknown."""
    try:
        text = THP_ENABLED.read_text()
    except OSError:
        return None
    start, end = text.find("["), text.find("]")
    return text[start + 1:end] if 0 <= start < end else None


def active(environ: Mapping[str, str] = os.environ) -> bool:
    """Whether a process started with this environment has glibc back large blocks with huge pages."""
    return TUNABLE in environ.get("GLIBC_TUNABLES", "").split(":")


def huge_page_environment(environ: Mapping[str, str], glibc: tuple[int, int] | None,
                          mode: str | None) -> dict[str, str] | None:
    """The environment to execute again with, or None where that changes nothing: it helps with glibc >= 2.35 and
    THP in "madvise" mode ("always" already backs large anonymous blocks with huge pages; "never" cannot)."""
    if environ.get(OPT_OUT) == "0" or active(environ) or glibc is None or glibc < MIN_GLIBC or mode != "madvise":
        return None
    tunables = environ.get("GLIBC_TUNABLES", "")
    return {**environ, "GLIBC_TUNABLES": f"{tunables}:{TUNABLE}" if tunables else TUNABLE}


def reexec_with_huge_pages() -> None:
    """Replace this process with the same command line under the tunable, when that would help; else return.
    Call it first thing in a program's entry point: nothing done before it survives the exec."""
    orig_argv = getattr(sys, "orig_argv", None)
    if not sys.platform.startswith("linux") or not orig_argv or not sys.executable:
        return
    env = huge_page_environment(os.environ, glibc_version(), thp_mode())
    if env is None:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *orig_argv[1:]], env)


def main() -> None:
    reexec_with_huge_pages()
    from gptx.cli import main as cli_main

    cli_main()
