"""`runtime.load(DIR)` -> Engine: text in, text out, for apps that embed gptx (numpy + onnxruntime + tiktoken only)."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from .backends import create_backend
from .backends.base import Backend
from .generation import Generator
from .manifest import load_manifest
from .sampler import SamplingParams
from .tokenizer import StreamDecoder, Tokenizer


class Engine:
    def __init__(self, backend: Backend, tokenizer: Tokenizer, manifest: dict):
        self.backend = backend
        self.tokenizer = tokenizer
        self.manifest = manifest
        self.eos_token_id = manifest["tokenizer"]["eot_token"]
        self.vocab_size = manifest["tokenizer"]["vocab_size"]

    def __repr__(self):
        return f"Engine({self.manifest.get('source')!r}, backend={self.backend.describe()})"

    @property
    def block_size(self) -> int:
        return self.backend.block_size

    # -- token ids -------------------------------------------------------------------------------
    def _prompt_ids(self, prompt: str | Sequence[int]) -> list[int]:
        ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else [int(t) for t in prompt]
        return ids or [self.eos_token_id]  # an empty prompt starts from <|endoftext|>, as GPT-2 was trained

    def generator(self, prompts_ids: Sequence[Sequence[int]], max_new_tokens: int = 64, temperature: float = 1.0,
                  top_k: int | None = None, top_p: float | None = None, repetition_penalty: float = 1.0,
                  seed: int | None = None, stop_at_eos: bool = True) -> Generator:
        """The low-level loop for callers that want to own it (append, generate_next, is_done)."""
        params = SamplingParams(temperature, top_k, top_p, repetition_penalty, seed)
        prompts = [self._prompt_ids(p) for p in prompts_ids]
        return Generator(self.backend, prompts, max_new_tokens, params,
                         self.eos_token_id if stop_at_eos else None, self.vocab_size, pad_id=self.eos_token_id)

    def generate_ids(self, prompt_ids, max_new_tokens: int = 64, **options) -> list[int] | list[list[int]]:
        """New token ids (eos included when hit) for one prompt (list of ints) or a batch (list of lists)."""
        single = len(prompt_ids) == 0 or not isinstance(prompt_ids[0], (list, tuple, np.ndarray))
        gen = self.generator([prompt_ids] if single else prompt_ids, max_new_tokens, **options)
        while not gen.is_done():
            gen.generate_next()
        return gen.tokens[0] if single else gen.tokens

    def stream_ids(self, prompt_ids: Sequence[int], max_new_tokens: int = 64, **options) -> Iterator[int]:
        gen = self.generator([prompt_ids], max_new_tokens, **options)
        while not gen.is_done():
            tok = int(gen.generate_next()[0])
            if tok < 0:
                break
            yield tok

    # -- text ------------------------------------------------------------------------------------
    def generate(self, prompt: str | Sequence[str], max_new_tokens: int = 64, stop: str | Sequence[str] | None = None,
                 **options) -> str | list[str]:
        """Continuation text for a prompt, or a list of them for a list of prompts (each its own length)."""
        single = isinstance(prompt, str)
        prompts = [prompt] if single else list(prompt)
        if not prompts:
            return []
        stops = [stop] if isinstance(stop, str) else list(stop or [])
        gen = self.generator([self.tokenizer.encode(p) for p in prompts], max_new_tokens, **options)
        while not gen.is_done():
            gen.generate_next()
            if stops:
                for row in np.flatnonzero(~gen.finished):
                    if any(s in self._text(gen.tokens[row]) for s in stops):
                        gen.stop_row(row)
        texts = [self._cut_at_stop(self._text(t), stops) for t in gen.tokens]
        return texts[0] if single else texts

    def stream(self, prompt: str, max_new_tokens: int = 64, stop: str | Sequence[str] | None = None,
               **options) -> Iterator[str]:
        """Text pieces as tokens arrive; a multi-byte character split across tokens is held back until whole."""
        if not isinstance(prompt, str):
            raise TypeError("stream takes one prompt (str); use generate for a batch")
        stops = [stop] if isinstance(stop, str) else list(stop or [])
        decoder = StreamDecoder(self.tokenizer)
        text, emitted = "", 0
        for tok in self.stream_ids(self._prompt_ids(prompt), max_new_tokens, **options):
            if tok == self.eos_token_id and options.get("stop_at_eos", True):
                break
            text += decoder.push(tok)
            cut = self._cut_at_stop(text, stops)
            if len(cut) < len(text):  # a stop string appeared: emit up to it and end
                yield cut[emitted:]
                return
            # hold back a tail that may be the start of a stop string still arriving
            safe = len(text) - self._stop_prefix_len(text, stops)
            if safe > emitted:
                yield text[emitted:safe]
                emitted = safe
        text = self._cut_at_stop(text + decoder.flush(), stops)
        if len(text) > emitted:
            yield text[emitted:]

    @staticmethod
    def _stop_prefix_len(text: str, stops: list[str]) -> int:
        """Length of the longest end of `text` that is a proper prefix of a stop string."""
        return max((k for s in stops for k in range(1, len(s)) if text.endswith(s[:k])), default=0)

    def _text(self, tokens: list[int]) -> str:
        if tokens and tokens[-1] == self.eos_token_id:
            tokens = tokens[:-1]
        return self.tokenizer.decode(tokens)

    @staticmethod
    def _cut_at_stop(text: str, stops: list[str]) -> str:
        cuts = [text.find(s) for s in stops if s and s in text]
        return text[: min(cuts)] if cuts else text


def load(directory: str | Path, backend: str = "auto", device: str = "cpu", verify_weights: bool = False,
         **backend_options) -> Engine:
    """Open a `gptx export` directory. backend: auto | onnxruntime | torch | tensorrt; device: cpu | cuda.
    File sizes are always checked against the manifest; `verify_weights=True` also checks their sha256."""
    directory = Path(directory)
    manifest = load_manifest(directory, verify_hashes=verify_weights)
    tokenizer = Tokenizer(directory / manifest["tokenizer"]["file"])
    return Engine(create_backend(backend, manifest, directory, device, **backend_options), tokenizer, manifest)
