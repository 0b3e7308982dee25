import pytest

from gptx.runtime import Tokenizer
from gptx.runtime.tokenizer import StreamDecoder, save_hf_vocab

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


def test_encode_batch_padding_and_mask():
    tok = Tokenizer()
    texts = ["Hello world", "a", "Three more words"]
    ragged = tok.encode_batch(texts)
    ids, mask = tok.encode_batch(texts, pad_to="longest", return_mask=True)
    assert [len(r) for r in ids] == [3, 3, 3]
    assert ids[1] == ragged[1] + [tok.eot_token] * 2 and mask[1] == [1, 0, 0]
    assert tok.encode_batch(texts, pad_to=5, pad_id=0)[0] == ragged[0] + [0, 0, 0]
    ids, mask = tok.encode_batch(texts, return_mask=True)  # no padding: the mask is all ones, ragged like the ids
    assert ids == ragged and mask == [[1] * len(r) for r in ragged]
    with pytest.raises(ValueError, match="text 2 is 3 tokens, longer than pad_to=2"):
        tok.encode_batch(texts, pad_to=2)
    for bad in (0, "max", 2.5, True):
        with pytest.raises(ValueError, match="pad_to"):
            tok.encode_batch(texts, pad_to=bad)
    with pytest.raises(ValueError, match="outside the tokenizer vocabulary"):
        tok.encode_batch(texts, pad_to="longest", pad_id=tok.vocab_size)
    with pytest.raises(TypeError, match="item 1"):
        tok.encode_batch(["ok", 3])


def test_missing_or_bad_vocab_file(tmp_path):
    from gptx.runtime.errors import GptxError

    with pytest.raises(GptxError, match="not found"):
        Tokenizer(tmp_path / "nope.tiktoken")
    secret = "hunter2-secret-line"
    cases = {
        "bad.tiktoken": f"{secret}\n",
        "badrank.tiktoken": f"aGk= {secret}\n",
        "empty.tiktoken": "",
        "blank.tiktoken": "\n\n",
        "gaps.tiktoken": "aGk= 0\naGk= 5\n",  # ranks not 0..n-1
    }
    for name, content in cases.items():
        (tmp_path / name).write_text(content)
        with pytest.raises(GptxError, match="not a GPT-2 BPE") as err:
            Tokenizer(tmp_path / name)
        message = str(err.value)
        assert "\n" not in message and secret not in message, message  # one line, never the file's contents
    with pytest.raises(GptxError, match="empty"):
        Tokenizer(tmp_path / "empty.tiktoken")


def test_bad_hf_vocab_files_do_not_echo_contents(hf_vocab_dir, tmp_path):
    import shutil

    from gptx.runtime.errors import GptxError

    d = tmp_path / "hf"
    shutil.copytree(hf_vocab_dir, d)
    (d / "vocab.json").write_text('{"hunter2-secret": ')
    with pytest.raises(GptxError, match="not a GPT-2 byte-level BPE") as err:
        Tokenizer(d)
    assert "hunter2" not in str(err.value)
    shutil.copy(hf_vocab_dir / "vocab.json", d / "vocab.json")
    lines = (hf_vocab_dir / "merges.txt").read_text().splitlines()
    (d / "merges.txt").write_text("\n".join([lines[0], lines[2], lines[1], *lines[3:]]) + "\n")  # swap two merges
    with pytest.raises(GptxError, match="does not match"):
        Tokenizer(d)


def test_a_replaced_vocab_file_is_read_again(tmp_path):
    """tiktoken's loaders cache files by path in the temp dir; ours reads the file itself every time."""
    from gptx.runtime.errors import GptxError

    path = tmp_path / "v.tiktoken"
    Tokenizer().save(path)
    assert Tokenizer(path).encode("Hello world") == [15496, 995]
    path.write_text("not ranks\n")
    with pytest.raises(GptxError, match="not a GPT-2 BPE"):
        Tokenizer(path)


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


def test_ranks_save_and_pickle_come_from_the_encoder(tmp_path):
    """The Python ranks dict is let go after building (tiktoken keeps it only for pickling): ranks(), save and
    pickle rebuild the same vocabulary from the encoder, and unpickling never reads the vocab file again."""
    import pickle

    from gptx.runtime.tokenizer import DEFAULT_VOCAB, _load_ranks

    default = Tokenizer()
    assert default.ranks() == _load_ranks(DEFAULT_VOCAB)
    assert default.save(tmp_path / "copy.tiktoken").read_bytes() == DEFAULT_VOCAB.read_bytes()
    vocab = tmp_path / "mine.tiktoken"
    vocab.write_bytes(DEFAULT_VOCAB.read_bytes())
    mine = Tokenizer(vocab)
    vocab.unlink()
    copy = pickle.loads(pickle.dumps(mine))
    text = CORPUS[4] + CORPUS[8]
    assert copy.vocab_size == mine.vocab_size and copy.vocab_file == vocab
    assert copy.encode(text, allow_special=True) == mine.encode(text, allow_special=True)
    assert copy.decode(copy.encode(text)) == text
