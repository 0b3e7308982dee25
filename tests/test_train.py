"""gpt_export.train: loss goes down, exact resume, checkpoints that load, clear errors, the bundled sample model."""

import importlib
import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from gpt_export.model import GPT, GPTConfig
from gpt_export.train import TrainConfig, get_lr, train
from gpt_export.weights import SAMPLE_MODELS, load_checkpoint
from runtime.errors import GptxError
from runtime.tokenizer import Tokenizer

TEXT = "First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n\n" * 60
SHAKESPEARE_TXT = Path(__file__).resolve().parents[1] / "gpt_export" / "data" / "tinyshakespeare.txt"
# measured on the shipped model (see docs/sample_model.md) + a margin; ln(50257) = 10.8 is a random model
SAMPLE_VAL_LOSS_MAX = 5.00 + 0.3  # measured 4.995 on the shipped file (docs/sample_model.md)


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models: one thread is faster (and deterministic) on a busy 2-core box; restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def text_file(tmp_path):
    path = tmp_path / "input.txt"
    path.write_text(TEXT, encoding="utf-8")
    return path


def tiny(data, out_dir, **kw):
    cfg = dict(data=str(data), out_dir=str(out_dir), n_layer=1, n_head=2, n_embd=16, block_size=16,
               batch_size=4, max_iters=12, learning_rate=1e-2, min_lr=1e-3, warmup_iters=2,
               eval_interval=4, eval_iters=2, tensorboard=False)
    cfg.update(kw)
    return TrainConfig(**cfg)


def test_loss_decreases(text_file, tmp_path):
    result = train(tiny(text_file, tmp_path / "out", max_iters=40, eval_interval=40), progress=False, log=lambda s: None)
    assert result["iter"] == 40
    assert result["train_loss"] < 6.0, result  # from ln(50304) = 10.8 at init
    assert result["val_loss"] < 6.0, result
    assert result["best_val_loss"] <= result["val_loss"]
    assert Path(result["checkpoint"]).is_file()
    assert result["tokens"] == len(Tokenizer().encode(TEXT))


def test_exact_resume(text_file, tmp_path):
    common = dict(dropout=0.1, lr_decay_iters=12)  # dropout: the torch RNG state must be restored too
    straight = train(tiny(text_file, tmp_path / "a", max_iters=12, **common), progress=False, log=lambda s: None,
                     return_model=True)
    first = train(tiny(text_file, tmp_path / "b", max_iters=6, **common), progress=False, log=lambda s: None)
    assert first["iter"] == 6
    resumed = train(tiny(text_file, tmp_path / "b", max_iters=12, resume=True, **common), progress=False,
                    log=lambda s: None, return_model=True)
    assert resumed["iter"] == 12
    assert resumed["last_batch_loss"] == straight["last_batch_loss"]
    assert resumed["val_loss"] == straight["val_loss"]
    a, b = straight["model"].state_dict(), resumed["model"].state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    # and the saved optimizer states agree too
    oa = torch.load(tmp_path / "a" / "ckpt.pt", weights_only=True)["optimizer"]
    ob = torch.load(tmp_path / "b" / "ckpt.pt", weights_only=True)["optimizer"]
    for pa, pb in zip(oa["state"].values(), ob["state"].values()):
        assert torch.equal(pa["exp_avg"], pb["exp_avg"])


def test_checkpoint_loads_and_matches_memory(text_file, tmp_path):
    result = train(tiny(text_file, tmp_path / "out", max_iters=4, tensorboard=True), progress=True,
                   log=lambda s: None, return_model=True)
    ckpt_path = Path(result["checkpoint"])
    ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True)  # only safe types stored
    assert ckpt["iter_num"] == 4 and ckpt["train_config"]["max_iters"] == 4
    assert {"optimizer", "rng", "best_val_loss", "model_args", "model"} <= ckpt.keys()
    loaded = GPT.from_pretrained(str(ckpt_path))
    assert loaded.config.vocab_size == 50304 and loaded.config.n_embd == 16
    idx = torch.tensor([Tokenizer().encode("First Citizen:\nBefore we")])
    model = result["model"].eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(idx)[0], model(idx)[0], rtol=0, atol=0)
    assert not list(ckpt_path.parent.glob("*.tmp"))  # written atomically
    try:
        importlib.import_module("torch.utils.tensorboard")
    except Exception:
        return  # tensorboard not installed: silently skipped by train()
    assert list((tmp_path / "out" / "tb").glob("events.out.tfevents.*"))


def test_half_checkpoint_is_smaller_and_loads(text_file, tmp_path):
    full = train(tiny(text_file, tmp_path / "f", max_iters=1), progress=False, log=lambda s: None)
    half = train(tiny(text_file, tmp_path / "h", max_iters=1, half_checkpoint=True), progress=False, log=lambda s: None)
    f = torch.load(full["checkpoint"], weights_only=True)["model"]["transformer.wte.weight"]
    h = torch.load(half["checkpoint"], weights_only=True)["model"]["transformer.wte.weight"]
    assert f.dtype == torch.float32 and h.dtype == torch.float16
    assert GPT.from_pretrained(half["checkpoint"]).transformer.wte.weight.dtype == torch.float32


def test_lr_schedule():
    cfg = TrainConfig(data="x", learning_rate=1e-3, min_lr=1e-4, warmup_iters=10, max_iters=110)
    lrs = [get_lr(i, cfg) for i in range(120)]
    assert all(a < b for a, b in zip(lrs[:10], lrs[1:11]))  # warmup increases
    assert lrs[10] == pytest.approx(1e-3)
    assert lrs[60] == pytest.approx(1e-4 + 0.5 * 9e-4)  # half way through the cosine
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))
    assert lrs[110] == lrs[119] == pytest.approx(1e-4)
    assert get_lr(60, replace(cfg, lr_decay_iters=210)) > lrs[60]


def test_init_from_checkpoint(text_file, tmp_path):
    base = train(tiny(text_file, tmp_path / "base", max_iters=8), progress=False, log=lambda s: None)
    tuned = train(tiny(text_file, tmp_path / "tuned", max_iters=2, init_from=base["checkpoint"], n_embd=32),
                  progress=False, log=lambda s: None, return_model=True)
    assert tuned["model"].config.n_embd == 16  # the pretrained model decides the shape
    # starts from the trained model (a fresh one is still at ~10.8 after 2 iterations)
    assert tuned["val_loss"] < min(base["val_loss"] + 0.5, 10.0), (base["val_loss"], tuned["val_loss"])


def test_usage_example_and_hand_written_loop(tmp_path):
    """The README-style flow: config -> model -> tokenizer -> forward -> decode; then a manual train/save/load."""
    torch.manual_seed(0)
    config = GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=32, vocab_size=50304)
    model = GPT(config)
    tok = Tokenizer()
    ids = tok.encode("ROMEO:\nBut soft, what light through yonder window breaks?")
    idx = torch.tensor([ids])
    logits, loss = model(idx[:, :-1], targets=idx[:, 1:])
    assert logits.shape == (1, len(ids) - 1, 50304) and math.isfinite(loss.item())
    out = model.generate(idx, max_new_tokens=3, temperature=0)
    assert out.shape == (1, len(ids) + 3)
    assert tok.decode(out[0, : len(ids)].tolist()).startswith("ROMEO:")

    data = torch.tensor(tok.encode(TEXT))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(15):
        i = torch.randint(len(data) - 33, (8,), generator=g)
        x = torch.stack([data[j: j + 32] for j in i])
        y = torch.stack([data[j + 1: j + 33] for j in i])
        _, loss = model(x, y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 2.0

    path = tmp_path / "manual.pt"
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict()}, path)
    state = torch.load(path, weights_only=True)
    clone = GPT(config)
    clone.load_state_dict(state["model"])
    opt2 = torch.optim.AdamW(clone.parameters(), lr=1e-2)
    opt2.load_state_dict(state["optimizer"])
    model.eval(), clone.eval()
    with torch.no_grad():
        assert torch.equal(model(x)[0], clone(x)[0])
    # one more identical step on both keeps them identical
    for m, o in ((model, optimizer), (clone, opt2)):
        m.train()
        _, loss = m(x, y)
        o.zero_grad()
        loss.backward()
        o.step()
    for (k, a), b in zip(model.state_dict().items(), clone.state_dict().values()):
        assert torch.equal(a, b), k


def test_missing_data_file(tmp_path):
    with pytest.raises(ValueError, match="data file not found"):
        train(tiny(tmp_path / "nope.txt", tmp_path / "out"), progress=False)
    with pytest.raises(GptxError, match="directory"):
        train(tiny(tmp_path, tmp_path / "out"), progress=False)


def test_text_too_short(tmp_path):
    path = tmp_path / "short.txt"
    path.write_text("To be or not to be.", encoding="utf-8")
    n = len(Tokenizer().encode("To be or not to be."))
    with pytest.raises(ValueError, match=rf"too short: {n} tokens.*block_size 16"):
        train(tiny(path, tmp_path / "out"), progress=False)
    assert not (tmp_path / "out" / "ckpt.pt").exists()


def test_resume_without_checkpoint(text_file, tmp_path):
    with pytest.raises(ValueError, match="cannot resume: no checkpoint"):
        train(tiny(text_file, tmp_path / "empty", resume=True), progress=False)


def test_out_dir_is_a_file(text_file, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(GptxError, match="not a directory"):
        train(tiny(text_file, blocker), progress=False)


def test_bad_config_values(text_file, tmp_path):
    with pytest.raises(ValueError, match="val_fraction"):
        train(tiny(text_file, tmp_path / "o", val_fraction=1.5), progress=False)
    with pytest.raises(ValueError, match="max_iters"):
        train(tiny(text_file, tmp_path / "o", max_iters=0), progress=False)


@pytest.mark.skipif(not SAMPLE_MODELS["shakespeare"].is_file(), reason="bundled sample model not built")
def test_bundled_shakespeare_model():
    path = SAMPLE_MODELS["shakespeare"]
    assert path.stat().st_size <= 8 * 1024 * 1024
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    assert "optimizer" not in ckpt  # shipped without training state
    model = GPT.from_pretrained("shakespeare")
    assert isinstance(model, GPT) and not model.training
    tok = Tokenizer()
    tokens = torch.tensor(tok.encode(SHAKESPEARE_TXT.read_text(encoding="utf-8")))
    val = tokens[int(len(tokens) * 0.9):]
    T = model.config.block_size
    starts = torch.linspace(0, len(val) - T - 2, 8).long()
    x = torch.stack([val[s: s + T] for s in starts])
    y = torch.stack([val[s + 1: s + 1 + T] for s in starts])
    with torch.no_grad():
        _, loss = model(x, y)
    assert loss.item() < SAMPLE_VAL_LOSS_MAX, loss.item()
