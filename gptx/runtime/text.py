"""Token ids in, safe text pieces out: the one place that turns a row's tokens into the text a caller sees, so
batch, stream and server text agree. A character split across tokens is held back until whole (StreamDecoder); the
text is cut at the first stop string (empty ones are ignored), a tail that may start one is held back until known
not to; the EOS token, when given, ends the text undecoded.
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
            return self._emit(self.decoder.flush(), final=True)
        return self._emit(self.decoder.push(token))

    def finish(self) -> str:
        """Whatever is still held back (an incomplete character, a possible stop prefix) once no token follows."""
        return "" if self.stopped else self._emit(self.decoder.flush(), final=True)

    # ------------------------------------------------------------------------------------------ internals
    def _emit(self, new: str, final: bool = False) -> str:
        """The text safe to hand out after `new`: all of it when `final` or past a stop string."""
        start = self.emitted
        self.text += new
        if self._cut() or final:
            self.emitted = len(self.text)
            return self.text[start:]
        safe = len(self.text) - self._stop_prefix_len()
        if safe <= start:
            return ""
        self.emitted = safe
        return self.text[start:safe]

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
