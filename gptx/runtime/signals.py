"""Signals as exceptions: SIGTERM unwinds like Ctrl-C (so cleanup runs), or waits until a block that must not
be cut midway has finished."""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C so every `finally`/cleanup runs (e.g. the export's partial directory)."""


@contextlib.contextmanager
def terminate_as_interrupt() -> Iterator[None]:
    """Within this block SIGTERM unwinds the stack like SIGINT does. Main thread only (signal's rule)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise Terminated()

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def interrupts_deferred() -> Iterator[None]:
    """Hold SIGINT / SIGTERM until the block ends, then deliver them to the handlers they would have met. For
    calls that cannot unwind midway: an exception inside torch's JIT tracer leaves it in a state that segfaults
    (about 1 in 20 SIGTERMs during `gptx export`). Main thread only (signal's rule); elsewhere the block runs as is."""
    signals = (signal.SIGINT, signal.SIGTERM)
    # None: a handler installed outside Python, which could not be put back afterwards
    if threading.current_thread() is not threading.main_thread() or None in map(signal.getsignal, signals):
        yield
        return
    caught: list[int] = []
    previous = {s: signal.signal(s, lambda signum, frame: caught.append(signum)) for s in signals}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    if caught:
        signal.raise_signal(caught[0])  # -> KeyboardInterrupt, Terminated (the CLI) or the default action
