"""GPT-2 byte-level BPE through tiktoken (fast, Rust), with the GPT-2 ranks shipped in the package for offline use."""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Iterable, Sequence

import tiktoken

from .errors import GptxError, InvalidInput

DEFAULT_VOCAB = Path(__file__).parent / "data" / "gpt2.tiktoken"
ENDOFTEXT = "<|endoftext|>"
# GPT-2's pre-tokenizer regex (same as tiktoken's r50k_base), kept here so no network lookup is needed.
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""
MAX_VOCAB_FILE_BYTES = 64 << 20  # GPT-2's files are under 1 MB; refuse to read anything absurdly large


# The vocabulary files are read here rather than with tiktoken.load: its loaders cache every file they read
# under the system temp dir keyed by the *path* (not the content), so a replaced vocab file would be silently
# ignored, and a file planted there by another user would be trusted. Their parse errors also echo file lines.
def _read(path: Path) -> bytes:
    if path.stat().st_size > MAX_VOCAB_FILE_BYTES:
        raise GptxError(f"{path} is larger than {MAX_VOCAB_FILE_BYTES >> 20} MB: not a GPT-2 BPE vocabulary")
    return path.read_bytes()


def _tiktoken_ranks(path: Path) -> dict[bytes, int]:
    """A .tiktoken file: one `<base64 token> <rank>` per line."""
    ranks = {}
    for number, line in enumerate(_read(path).splitlines(), 1):
        parts = line.split()
        if not parts:
            continue
        try:  # ValueError (binascii.Error is one): not two fields, or these two conversions only
            token, rank = parts
            ranks[base64.b64decode(token, validate=True)] = int(rank)
        except ValueError:
            raise GptxError(f"{path} line {number} is not '<base64 token> <rank>': "
                            "not a GPT-2 BPE vocabulary") from None
    return ranks


def _hf_ranks(vocab_json: Path, merges: Path) -> dict[bytes, int]:
    """Hugging Face's vocab.json + merges.txt; merged tokens' ids must follow the merge order (as tiktoken checks)."""
    byte_of = {char: byte for byte, char in bytes_to_unicode().items()}
    not_bpe = GptxError(f"{vocab_json.parent}: vocab.json / merges.txt are not a GPT-2 byte-level BPE vocabulary")
    try:
        vocab = json.loads(_read(vocab_json).decode("utf-8"))
        merge_lines = [line.split() for line in _read(merges).decode("utf-8").splitlines()[1:]]  # 1st: "#version"
    except ValueError:  # UnicodeDecodeError and JSONDecodeError
        raise not_bpe from None
    if not isinstance(vocab, dict) or not all(isinstance(r, int) for r in vocab.values()) or \
            any(len(pair) != 2 for pair in merge_lines if pair):
        raise not_bpe
    try:
        ranks = {bytes(byte_of[c] for c in token): rank for token, rank in vocab.items()
                 if token not in (ENDOFTEXT, "<|startoftext|>")}
        merged = [bytes(byte_of[c] for c in a + b) for a, b in (pair for pair in merge_lines if pair)]
    except KeyError:  # a character outside GPT-2's byte-to-unicode map
        raise not_bpe from None
    if any(ranks.get(token) != 256 + i for i, token in enumerate(merged)):
        raise GptxError(f"{vocab_json.parent}: merges.txt does not match the ids in vocab.json")
    return ranks


def _load_ranks(vocab_file: Path) -> dict[bytes, int]:
    """Ranks from a .tiktoken file, an HF directory, or a vocab.json with merges.txt beside it, checked to be usable."""
    if vocab_file.is_dir() or vocab_file.name.endswith(".json"):
        vocab_json = vocab_file / "vocab.json" if vocab_file.is_dir() else vocab_file
        merges = vocab_json.with_name("merges.txt")
        if not (vocab_json.is_file() and merges.is_file()):
            raise GptxError(f"{vocab_file}: need vocab.json and merges.txt side by side")
        ranks = _hf_ranks(vocab_json, merges)
    else:
        ranks = _tiktoken_ranks(vocab_file)
    if not ranks:
        raise GptxError(f"{vocab_file} holds no BPE ranks (an empty file?): not a GPT-2 BPE vocabulary")
    if sorted(ranks.values()) != list(range(len(ranks))) or not all(bytes([b]) in ranks for b in range(256)):
        raise GptxError(f"{vocab_file}: the ranks must be 0..n-1 and cover all 256 bytes: not a GPT-2 BPE vocabulary")
    return ranks


class Tokenizer:
    """encode/decode GPT-2 text. `<|endoftext|>` in text is plain text unless `allow_special=True`."""

    def __init__(self, vocab_file: str | Path | None = None):
        path = Path(vocab_file) if vocab_file is not None else DEFAULT_VOCAB
        if not path.exists():
            raise GptxError(f"tokenizer file not found: {path}")
        self._build(path, _load_ranks(path))

    def _build(self, path: Path, ranks: dict[bytes, int]) -> None:
        self.vocab_file = path
        self.eot_token = len(ranks)  # GPT-2 puts <|endoftext|> right after the 50256 BPE ranks
        self._enc = tiktoken.Encoding(name=f"gpt2:{path.name}", pat_str=GPT2_PATTERN, mergeable_ranks=ranks,
                                      special_tokens={ENDOFTEXT: self.eot_token})
        # tiktoken keeps the ranks dict only to pickle the Encoding (its Rust core holds its own copy): letting it go
        # frees 9 MiB of every process's RSS on GPT-2 (measured). ranks() rebuilds it when save or pickle need it.
        self._enc._mergeable_ranks = None
        self.vocab_size = self._enc.n_vocab

    def ranks(self) -> dict[bytes, int]:
        """{token bytes: rank} of the BPE vocabulary (without <|endoftext|>), read back from the encoder."""
        return {token: self._enc.encode_single_token(token) for token in self._enc.token_byte_values()}

    def __getstate__(self):  # pickled with its ranks: unpickling never reads `vocab_file` again (it may have changed)
        return self.vocab_file, self.ranks()

    def __setstate__(self, state):
        self._build(*state)

    def __repr__(self):
        return f"Tokenizer(vocab_file={str(self.vocab_file)!r}, vocab_size={self.vocab_size})"

    def encode(self, text: str, allow_special: bool = False) -> list[int]:
        if not isinstance(text, str):
            raise TypeError(f"encode expects a str, got {type(text).__name__}")
        if allow_special:
            return self._enc.encode(text, allowed_special="all")
        return self._enc.encode_ordinary(text)

    def encode_batch(self, texts: Sequence[str], allow_special: bool = False, *, pad_to: int | str | None = None,
                     pad_id: int | None = None, return_mask: bool = False):
        """Token lists for a list of texts, as HF tokenizers give them: each its own length (`GPT.forward` takes
        ragged lists), or with pad_to ("longest" or a length) padded on the right with `pad_id` (default
        <|endoftext|>, GPT-2's usual pad; a longer text is an error, never cut). return_mask=True: (ids, mask)."""
        if isinstance(texts, str):
            raise TypeError("encode_batch expects a list of str; use encode for a single text")
        texts = list(texts)
        for i, text in enumerate(texts):
            if not isinstance(text, str):
                raise TypeError(f"encode_batch expects a list of str; item {i} is a {type(text).__name__}")
        enc = self._enc
        ids = enc.encode_batch(texts, allowed_special="all") if allow_special else enc.encode_ordinary_batch(texts)
        lengths = [len(row) for row in ids]
        if pad_to is not None:
            if pad_to != "longest" and (isinstance(pad_to, bool) or not isinstance(pad_to, int) or pad_to <= 0):
                raise InvalidInput(f"pad_to must be None, 'longest' or a positive int, got {pad_to!r}")
            width = max(lengths, default=0) if pad_to == "longest" else pad_to
            longer = [(i, n) for i, n in enumerate(lengths) if n > width]
            if longer:
                raise InvalidInput(f"text {longer[0][0]} is {longer[0][1]} tokens, longer than pad_to={pad_to}")
            pad = self.eot_token if pad_id is None else self._check_ids([pad_id])[0]
            ids = [row + [pad] * (width - len(row)) for row in ids]
        if not return_mask:
            return ids
        return ids, [[1] * n + [0] * (len(row) - n) for row, n in zip(ids, lengths)]

    def _check_ids(self, tokens: Iterable[int]) -> list[int]:
        ids = [int(t) for t in tokens]
        bad = [t for t in ids if not 0 <= t < self.vocab_size]
        if bad:
            raise InvalidInput(f"token id {bad[0]} is outside the tokenizer vocabulary [0, {self.vocab_size})")
        return ids

    def decode_bytes(self, tokens: Iterable[int]) -> bytes:
        return self._enc.decode_bytes(self._check_ids(tokens))

    def decode(self, tokens):
        """list of ints -> str; list of lists -> list of str. Broken UTF-8 at the edges becomes U+FFFD."""
        tokens = list(tokens.tolist() if hasattr(tokens, "tolist") else tokens)  # numpy arrays and torch tensors
        if tokens and isinstance(tokens[0], (list, tuple)) or (tokens and hasattr(tokens[0], "tolist")):
            return [self.decode(t) for t in tokens]
        return self.decode_bytes(tokens).decode("utf-8", errors="replace")

    def save(self, path: str | Path) -> Path:
        """Write the ranks as a .tiktoken file (what export puts beside the ONNX model)."""
        path = Path(path)
        ranks = sorted(self.ranks().items(), key=lambda kv: kv[1])
        path.write_text("".join(f"{base64.b64encode(token).decode()} {rank}\n" for token, rank in ranks))
        return path


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map used by vocab.json / merges.txt."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    rest = [b for b in range(256) if b not in printable]  # mapped to 256, 257, ... in byte order
    return dict(zip(printable + rest, map(chr, printable + [256 + i for i in range(len(rest))])))


def save_hf_vocab(tokenizer: "Tokenizer", directory: str | Path) -> Path:
    """Write vocab.json + merges.txt (the Hugging Face GPT-2 format) for the same vocabulary. Each merge is what
    BPE leaves of a token's bytes with only the older (lower-rank) merges: the pair that this token merges."""
    ranks = tokenizer.ranks()
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
