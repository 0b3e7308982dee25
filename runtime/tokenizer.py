"""GPT-2 byte-level BPE through tiktoken (fast, Rust), with the GPT-2 ranks shipped in the package for offline use."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable, Sequence

import tiktoken
from tiktoken.load import data_gym_to_mergeable_bpe_ranks, load_tiktoken_bpe

from .errors import GptxError

DEFAULT_VOCAB = Path(__file__).parent / "data" / "gpt2.tiktoken"
ENDOFTEXT = "<|endoftext|>"
# GPT-2's pre-tokenizer regex (same as tiktoken's r50k_base), kept here so no network lookup is needed.
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""


def _load_ranks(vocab_file: Path) -> dict[bytes, int]:
    """Ranks from a .tiktoken file, an HF directory, or a vocab.json with merges.txt beside it."""
    if vocab_file.is_dir():
        vocab_json, merges = vocab_file / "vocab.json", vocab_file / "merges.txt"
    elif vocab_file.name.endswith(".json"):
        vocab_json, merges = vocab_file, vocab_file.with_name("merges.txt")
    else:
        return load_tiktoken_bpe(str(vocab_file))
    if not (vocab_json.is_file() and merges.is_file()):
        raise GptxError(f"{vocab_file}: need vocab.json and merges.txt side by side")
    return data_gym_to_mergeable_bpe_ranks(str(merges), str(vocab_json))


class Tokenizer:
    """encode/decode GPT-2 text. `<|endoftext|>` in text is plain text unless `allow_special=True`."""

    def __init__(self, vocab_file: str | Path | None = None):
        path = Path(vocab_file) if vocab_file is not None else DEFAULT_VOCAB
        if not path.exists():
            raise GptxError(f"tokenizer file not found: {path}")
        try:
            ranks = _load_ranks(path)
        except GptxError:
            raise
        except Exception as e:  # tiktoken raises assorted errors for files that are not BPE ranks
            raise GptxError(f"{path} is not a GPT-2 BPE vocabulary: {e}") from None
        self.vocab_file = path
        self.eot_token = len(ranks)  # GPT-2 puts <|endoftext|> right after the 50256 BPE ranks
        self._enc = tiktoken.Encoding(
            name=f"gpt2:{path.name}", pat_str=GPT2_PATTERN, mergeable_ranks=ranks,
            special_tokens={ENDOFTEXT: self.eot_token},
        )
        self.vocab_size = self._enc.n_vocab

    def __repr__(self):
        return f"Tokenizer(vocab_file={str(self.vocab_file)!r}, vocab_size={self.vocab_size})"

    def encode(self, text: str, allow_special: bool = False) -> list[int]:
        if not isinstance(text, str):
            raise TypeError(f"encode expects a str, got {type(text).__name__}")
        if allow_special:
            return self._enc.encode(text, allowed_special="all")
        return self._enc.encode_ordinary(text)

    def encode_batch(self, texts: Sequence[str], allow_special: bool = False) -> list[list[int]]:
        if isinstance(texts, str):
            raise TypeError("encode_batch expects a list of str; use encode for a single text")
        if allow_special:
            return self._enc.encode_batch(list(texts), allowed_special="all")
        return self._enc.encode_ordinary_batch(list(texts))

    def _check_ids(self, tokens: Iterable[int]) -> list[int]:
        ids = [int(t) for t in tokens]
        bad = [t for t in ids if not 0 <= t < self.vocab_size]
        if bad:
            raise ValueError(f"token id {bad[0]} is outside the tokenizer vocabulary [0, {self.vocab_size})")
        return ids

    def decode_bytes(self, tokens: Iterable[int]) -> bytes:
        return self._enc.decode_bytes(self._check_ids(tokens))

    def decode(self, tokens):
        """list of ints -> str; list of lists -> list of str. Broken UTF-8 at the edges becomes U+FFFD."""
        if hasattr(tokens, "tolist"):  # numpy arrays and torch tensors
            tokens = tokens.tolist()
        tokens = list(tokens)
        if tokens and isinstance(tokens[0], (list, tuple)) or (tokens and hasattr(tokens[0], "tolist")):
            return [self.decode(t) for t in tokens]
        return self.decode_bytes(tokens).decode("utf-8", errors="replace")

    def save(self, path: str | Path) -> Path:
        """Write the ranks as a .tiktoken file (what export puts beside the ONNX model)."""
        import base64

        path = Path(path)
        lines = [
            base64.b64encode(token).decode() + " " + str(rank)
            for token, rank in sorted(self._enc._mergeable_ranks.items(), key=lambda kv: kv[1])
        ]
        path.write_text("\n".join(lines) + "\n")
        return path


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map used by vocab.json / merges.txt."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, chars)))


def save_hf_vocab(tokenizer: "Tokenizer", directory: str | Path) -> Path:
    """Write vocab.json + merges.txt (the Hugging Face GPT-2 format) for the same vocabulary.

    Each merge is recovered by running BPE on a token's bytes with only the older (lower-rank) merges:
    what is left is the pair that this token merges.
    """
    ranks = tokenizer._enc._mergeable_ranks
    to_text = bytes_to_unicode()
    enc = lambda b: "".join(to_text[x] for x in b)  # noqa: E731
    vocab = {enc(t): r for t, r in ranks.items()}
    vocab[ENDOFTEXT] = tokenizer.eot_token
    merges = []
    for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
        if len(token) < 2:
            continue
        parts = [bytes([b]) for b in token]
        while len(parts) > 2:
            best_rank, i = min((ranks.get(parts[i] + parts[i + 1], 1 << 62), i) for i in range(len(parts) - 1))
            if best_rank >= rank:
                break
            parts[i:i + 2] = [parts[i] + parts[i + 1]]
        if len(parts) != 2:
            raise GptxError(f"token rank {rank} cannot be expressed as one merge: not a BPE vocabulary")
        merges.append(f"{enc(parts[0])} {enc(parts[1])}")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (directory / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    return directory


class StreamDecoder:
    """Turns a token stream into text pieces that never split a UTF-8 character."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self.pending = b""

    def push(self, token: int) -> str:
        self.pending += self.tokenizer.decode_bytes([token])
        try:
            text = self.pending.decode("utf-8")
        except UnicodeDecodeError as e:
            if e.reason == "unexpected end of data" and len(self.pending) - e.start < 4:
                text = self.pending[: e.start].decode("utf-8", errors="replace")
                self.pending = self.pending[e.start:]
                return text
            text = self.pending.decode("utf-8", errors="replace")
        self.pending = b""
        return text

    def flush(self) -> str:
        text, self.pending = self.pending.decode("utf-8", errors="replace"), b""
        return text
