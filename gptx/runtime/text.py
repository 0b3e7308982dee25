"""Token ids in, safe text pieces out: the one place that turns a row's tokens into the text a caller sees.

Used by Engine.generate / Engine.stream and by the scheduler, so batch, stream and server text agree:
  * UTF-8 safe: a character split across tokens is held back until whole (StreamDecoder);
  * stop strings: the text is cut at the first occurrence of any of them, and a tail that may be the start
    of a stop string still arriving is held back until it is known not to be one;
  * end-of-text: the EOS token ends the text (it is not decoded) when `eos_token_id` is given.
An empty stop string is ignored (it would otherwise match before the first character).
"""

from __future__ import annotations

from typing import Sequence

from .errors import InvalidInput
from .tokenizer import StreamDecoder, Tokenizer


def normalize_stop(stop: str | Sequence[str] | None) -> tuple[str, ...]:
    """None, a string or a list of strings -> a tuple of the non-empty stop strings (empty ones are ignored)."""
    if stop is None:
        return ()
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, (list, tuple)) or not all(isinstance(s, str) for s in stops):
        raise InvalidInput(f"stop must be a string or a list of strings, got {stop!r}")
    return tuple(dict.fromkeys(s for s in stops if s))


class TextStream:
    """Feed a row's tokens one at a time with `push`; `finish` at the end. `stopped` says the row is done
    (a stop string or EOS appeared); `text` is everything emitted so far."""

    def __init__(self, tokenizer: Tokenizer, stop: str | Sequence[str] | None = None, eos_token_id: int | None = None):
        self.decoder = StreamDecoder(tokenizer)
        self.stops = normalize_stop(stop)
        self.eos_token_id = eos_token_id
        self.stopped = False
        self.text = ""        # decoded so far (past a stop: cut there)
        self.emitted = 0      # how much of `text` has been handed out

    def push(self, token: int) -> str:
        """The new safe text after `token` (often "", while a character or a possible stop is incomplete)."""
        if self.stopped:
            return ""
        if token == self.eos_token_id:
            self.stopped = True
            return self._emit_all(self.decoder.flush())
        return self._emit(self.decoder.push(token))

    def finish(self) -> str:
        """Whatever is still held back (an incomplete character, a possible stop prefix) once no token follows."""
        if self.stopped:
            return ""
        return self._emit_all(self.decoder.flush())

    # ------------------------------------------------------------------------------------------ internals
    def _emit(self, new: str) -> str:
        start = self.emitted
        self.text += new
        if self._cut():
            return self.text[start:]
        safe = len(self.text) - self._stop_prefix_len()
        if safe <= start:
            return ""
        self.emitted = safe
        return self.text[start:safe]

    def _emit_all(self, new: str) -> str:
        start = self.emitted
        self.text += new
        self._cut()
        self.emitted = len(self.text)
        return self.text[start:]

    def _cut(self) -> bool:
        """Cut `text` at the first stop string; a stop can only start in the not-yet-emitted part."""
        if not self.stops:
            return False
        pending = self.text[self.emitted:]
        cuts = [i for i in (pending.find(s) for s in self.stops) if i >= 0]
        if not cuts:
            return False
        self.text = self.text[: self.emitted + min(cuts)]
        self.emitted = len(self.text)
        self.stopped = True
        return True

    def _stop_prefix_len(self) -> int:
        """Length of the longest end of the pending text that is a proper prefix of a stop string."""
        pending = self.text[self.emitted:]
        return max((k for s in self.stops for k in range(min(len(s) - 1, len(pending)), 0, -1)
                    if pending.endswith(s[:k])), default=0)
