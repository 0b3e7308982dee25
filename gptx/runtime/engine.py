"""`gptx.runtime.load(DIR)` -> Engine: text in, text out, for apps embedding gptx (numpy + onnxruntime + tiktoken only).
Every call runs the one generation loop, the Scheduler: the synchronous ones step a fixed batch of it in the
caller's thread (`Generation`); `serving()` opens an async pool whose worker thread steps one for many callers.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from .backends import create_backend
from .backends.base import Backend
from .errors import InvalidInput
from .generation import Generation, resolve_new_tokens
from .kv_cache import OnStep
from .manifest import load_manifest
from .request import TokenIds, token_ids
from .sampler import SamplingParams
from .tokenizer import Tokenizer


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
        """The longest sequence (prompt + new tokens) this engine runs."""
        return self.backend.capabilities.max_seq

    # -- token ids -------------------------------------------------------------------------------
    def prompt_ids(self, prompt: str | Sequence[int]) -> TokenIds:
        """Text or token ids -> checked TokenIds (never checked again); an empty prompt starts from
        <|endoftext|>, as GPT-2 was trained."""
        ids = TokenIds(self.tokenizer.encode(prompt)) if isinstance(prompt, str) else token_ids(prompt, self.vocab_size)
        return ids or TokenIds([self.eos_token_id])

    def generator(self, prompts_ids: Sequence[Sequence[int]], max_new_tokens: int | None = None,
                  temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
                  repetition_penalty: float = 1.0, seed: int | None = None, stop_at_eos: bool = True,
                  max_length: int | None = None, stop: str | Sequence[str] | None = None,
                  on_step: OnStep | None = None) -> Generation:
        """The loop for callers that want to own it (generate_next, is_done, tokens, texts, stop_row).
        max_new_tokens (default 64) or max_length (prompt + new tokens, as in transformers), not both."""
        params = SamplingParams(temperature, top_k, top_p, repetition_penalty, seed)
        if isinstance(prompts_ids, (str, bytes)) or not isinstance(prompts_ids, (list, tuple, np.ndarray)):
            raise InvalidInput("generator takes a list of prompts, each a list of token ids")
        prompts = [self.prompt_ids(p) for p in prompts_ids]
        if not prompts:
            raise InvalidInput("generator needs at least one prompt")
        new = resolve_new_tokens(max_new_tokens, max_length, max(map(len, prompts)), self.block_size)
        return Generation(self.backend, self.tokenizer, prompts, new, params, eos_token_id=self.eos_token_id,
                          vocab_size=self.vocab_size, stop_at_eos=stop_at_eos, stop=stop, on_step=on_step)

    def generate_ids(self, prompt_ids, max_new_tokens: int | None = None, **options) -> list[int] | list[list[int]]:
        """New token ids (eos included when hit) for one prompt (list of ints) or a batch (list of lists)."""
        single = len(prompt_ids) == 0 or not isinstance(prompt_ids[0], (list, tuple, np.ndarray))
        gen = self.generator([prompt_ids] if single else prompt_ids, max_new_tokens, **options)
        for _ in gen.steps():
            pass
        return gen.tokens[0] if single else gen.tokens

    def stream_ids(self, prompt_ids: Sequence[int], max_new_tokens: int | None = None, **options) -> Iterator[int]:
        """Token ids as they are sampled (eos included when hit). Arguments are checked when called."""
        steps = self.generator([prompt_ids], max_new_tokens, **options).steps()
        return (o.token_id for outputs in steps for o in outputs if o.token_id is not None)

    # -- text ------------------------------------------------------------------------------------
    def generate(self, prompt: str | Sequence[str], max_new_tokens: int | None = None,
                 stop: str | Sequence[str] | None = None, **options) -> str | list[str]:
        """Continuation text for a prompt, or a list of them for a list of prompts (each its own length). It ends at
        <|endoftext|> (unless stop_at_eos=False), at the first stop string (cut there) or after max_new_tokens."""
        single = isinstance(prompt, str)
        prompts = [prompt] if single else list(prompt)
        if not prompts:
            return []
        if not all(isinstance(p, str) for p in prompts):
            raise InvalidInput("generate takes a prompt string or a list of them; use generate_ids for token ids")
        gen = self.generator(prompts, max_new_tokens, stop=stop, **options)
        for _ in gen.steps():
            pass
        return gen.texts[0] if single else gen.texts

    def stream(self, prompt: str, max_new_tokens: int | None = None, stop: str | Sequence[str] | None = None,
               **options) -> Iterator[str]:
        """Text pieces as tokens arrive (the same text `generate` returns). Arguments are checked when called,
        before the first piece; a multi-byte character split across tokens is held back until whole."""
        if not isinstance(prompt, str):
            raise InvalidInput("stream takes one prompt (str); use generate for a batch")
        steps = self.generator([prompt], max_new_tokens, stop=stop, **options).steps()
        return (piece for outputs in steps if (piece := "".join(o.text for o in outputs)))

    # -- serving ---------------------------------------------------------------------------------
    def serving(self, max_batch: int = 8, max_queue: int = 64, **options):
        """An async pool that batches concurrent requests continuously: `async with engine.serving() as pool`.
        See gptx/runtime/serving.py (options: prefill_chunk, prefix_cache_mb, on_step)."""
        from .serving import Pool

        return Pool(self, max_batch=max_batch, max_queue=max_queue, **options)


def load(directory: str | Path, backend: str = "auto", device: str = "cpu", verify_weights: bool = False,
         **backend_options) -> Engine:
    """Open a `gptx export` directory. backend: auto | onnxruntime | torch | tensorrt; device: cpu | cuda.
    File sizes are always checked against the manifest; `verify_weights=True` also checks their sha256."""
    directory = Path(directory)
    manifest = load_manifest(directory, verify_hashes=verify_weights)
    tokenizer = Tokenizer(directory / manifest["tokenizer"]["file"])
    return Engine(create_backend(backend, manifest, directory, device, **backend_options), tokenizer, manifest)
