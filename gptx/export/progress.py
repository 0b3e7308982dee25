"""Step-by-step progress for long CLI work: a spinner while a step runs, a ✓ line with its time after."""

from __future__ import annotations

import contextlib
import sys
import time

from rich.console import Console
from rich.markup import escape


class Steps:
    """The steps of one command, timed; shown on stderr when `enabled`."""

    def __init__(self, enabled: bool = True, console: Console | None = None):
        self.enabled = enabled
        self.console = console or Console(stderr=True, emoji=False)
        self.timings: dict[str, float] = {}

    @contextlib.contextmanager
    def step(self, title: str):
        start = time.perf_counter()
        shown = escape(title)  # titles may name user input (a path, a scheme): never markup
        live = self.enabled and sys.stderr.isatty()
        status = self.console.status(f"{shown}…") if live else contextlib.nullcontext()
        try:
            with status:
                yield
        except BaseException:
            if self.enabled:
                self.console.print(f"[red]✗[/red] {shown}")
            raise
        self.timings[title] = time.perf_counter() - start
        if self.enabled:
            self.console.print(f"[green]✓[/green] {shown} [dim]({self.timings[title]:.1f}s)[/dim]")
