"""Chat messages -> one prompt for a GPT-2-style model, which has no chat format of its own.

The default is a plain transcript ("User: ...", "Assistant: ...", system messages first), the shape GPT-2 saw in
dialogue on the web, ending in "Assistant:"; generation also stops at "\\nUser:". `gptx serve --chat-template FILE.json`
overrides any part (keys as in ChatTemplate; "{content}" marks where a message's text goes).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, fields
from pathlib import Path

from ..errors import InvalidInput

CONTENT = "{content}"
MAX_TEMPLATE_BYTES = 64 * 1024


@dataclass(frozen=True)
class ChatTemplate:
    system: str = "{content}\n\n"
    user: str = "User: {content}\n"
    assistant: str = "Assistant: {content}\n"
    generation_prompt: str = "Assistant:"      # appended after the last message: the model's turn
    stop: tuple[str, ...] = ("\nUser:",)       # added to the request's own stop strings

    def __post_init__(self):
        for name in ("system", "user", "assistant"):
            if not isinstance(getattr(self, name), str) or CONTENT not in getattr(self, name):
                raise InvalidInput(f"chat template '{name}' must be a string containing {CONTENT}")
        if not isinstance(self.generation_prompt, str):
            raise InvalidInput("chat template 'generation_prompt' must be a string")
        if not isinstance(self.stop, (list, tuple)) or not all(isinstance(s, str) for s in self.stop):
            raise InvalidInput("chat template 'stop' must be a list of strings")
        object.__setattr__(self, "stop", tuple(self.stop))

    def render(self, messages: list[tuple[str, str]]) -> str:
        """(role, text) pairs -> the prompt; "developer" is OpenAI's newer name for "system"."""
        turns = {"system": self.system, "developer": self.system, "user": self.user, "assistant": self.assistant}
        # replace, not str.format: braces in messages stay text
        return "".join(turns[role].replace(CONTENT, text) for role, text in messages) + self.generation_prompt

    @classmethod
    def from_file(cls, path: str | Path) -> ChatTemplate:
        """A JSON object with any of the field names; the file is untrusted (size, keys and types checked)."""
        path = Path(path)
        if not path.is_file():
            raise InvalidInput(f"chat template {path} is not a file")
        if path.stat().st_size > MAX_TEMPLATE_BYTES:
            raise InvalidInput(f"chat template {path} is larger than {MAX_TEMPLATE_BYTES} bytes")
        try:
            values = json.loads(path.read_bytes())
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise InvalidInput(f"chat template {path} is not valid JSON") from None
        if not isinstance(values, dict):
            raise InvalidInput(f"chat template {path} must hold a JSON object")
        known = {f.name for f in fields(cls)}
        if set(values) - known:  # not named: the file is untrusted
            raise InvalidInput(f"chat template {path}: unknown keys (known: {', '.join(sorted(known))})")
        return cls(**values)
