import pytest

from gpt_export import Tokenizer
from runtime.tokenizer import StreamDecoder, save_hf_vocab

CORPUS = [
    "Hello world",
    "  leading spaces and trailing   ",
    "Tabs\tand\nnewlines\r\n\n\nmany",
    "Unicode: naïve café, Ελληνικά, русский, 中文字符,日本語のテキスト",
    "Emoji 🎉🔥👩‍👩‍👧‍👦 and flags 🇫🇷",
    "Digits 1234567890 3.14159 1,000,000 2026-11-25",
    "def f(x):\n    return x**2  # comment\n\tif x != 0: pass",
    "Contractions: I'm you're he's we'll they've it'd",
    "Special <|endoftext|> text stays plain",
    "      \n\n   \t  ",
    "MixedCASE camelCase snake_case kebab-case",
    "URL https://example.com/a?b=c&d=e#f",
    "",
]


@pytest.fixture(scope="module")
def hf_vocab_dir(tmp_path_factory):
    """vocab.json + merges.txt written from our shipped ranks, so transformers tokenizes with the same vocabulary."""
    return save_hf_vocab(Tokenizer(), tmp_path_factory.mktemp("vocab"))


@pytest.fixture(scope="module")
def hf_tokenizer(hf_vocab_dir):
    from transformers import GPT2TokenizerFast

    return GPT2TokenizerFast.from_pretrained(str(hf_vocab_dir))


def test_default_vocab_is_gpt2():
    tok = Tokenizer()
    assert tok.vocab_size == 50257 and tok.eot_token == 50256
    assert tok.encode("Hello world") == [15496, 995]


@pytest.mark.parametrize("text", CORPUS)
def test_ids_match_transformers(hf_tokenizer, text):
    tok = Tokenizer()
    ours = tok.encode(text)
    # transformers treats <|endoftext|> as special; compare plain-text handling on the rest
    if "<|endoftext|>" in text:
        theirs = hf_tokenizer(text, split_special_tokens=True)["input_ids"]
    else:
        theirs = hf_tokenizer.encode(text)
    assert ours == theirs
    assert tok.decode(ours) == text


def test_special_token_only_when_asked():
    tok = Tokenizer()
    assert tok.eot_token not in tok.encode("a <|endoftext|> b")
    assert tok.encode("a<|endoftext|>b", allow_special=True) == tok.encode("a") + [tok.eot_token] + tok.encode("b")


def test_encode_batch_and_decode_lists():
    tok = Tokenizer()
    batch = tok.encode_batch(CORPUS[:4])
    assert batch == [tok.encode(t) for t in CORPUS[:4]]
    assert tok.decode(batch) == CORPUS[:4]
    with pytest.raises(TypeError):
        tok.encode_batch("not a list")


def test_invalid_ids_raise():
    tok = Tokenizer()
    with pytest.raises(ValueError, match="outside the tokenizer vocabulary"):
        tok.decode([1, 2, 50257])
    with pytest.raises(ValueError):
        tok.decode([-1])


def test_loads_hf_vocab_dir_and_tiktoken_file(hf_vocab_dir, tmp_path):
    default = Tokenizer()
    from_hf = Tokenizer(hf_vocab_dir)
    from_json = Tokenizer(hf_vocab_dir / "vocab.json")
    saved = Tokenizer(default.save(tmp_path / "copy.tiktoken"))
    text = CORPUS[3] + CORPUS[4] + CORPUS[6]
    assert from_hf.encode(text) == from_json.encode(text) == saved.encode(text) == default.encode(text)


def test_missing_or_bad_vocab_file(tmp_path):
    from runtime.errors import GptxError

    with pytest.raises(GptxError, match="not found"):
        Tokenizer(tmp_path / "nope.tiktoken")
    bad = tmp_path / "bad.tiktoken"
    bad.write_text("this is not base64 ranks\n")
    with pytest.raises(GptxError, match="not a GPT-2 BPE"):
        Tokenizer(bad)


def test_stream_decoder_never_splits_characters():
    tok = Tokenizer()
    text = "emoji 🎉🔥 and 中文 done"
    ids = tok.encode(text)
    dec = StreamDecoder(tok)
    pieces = [dec.push(t) for t in ids] + [dec.flush()]
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)
    # at least one emoji spans several tokens, so something was held back
    assert any(p == "" for p in pieces[:-1])
