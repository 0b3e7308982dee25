"""Shared fixtures: tiny GPT-2 models built locally (the Hub is not needed), and exports of them."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def share_cores_between_workers() -> int:
    """Under pytest-xdist, give each worker its own slice of this process's cores (its subprocesses inherit it), so
    workers' thread pools (torch, onnxruntime) don't spin against each other; the cores this process may use."""
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1 and len(cpus) >= workers:
        cpus = cpus[int(os.environ["PYTEST_XDIST_WORKER"].removeprefix("gw")) % workers::workers]
        os.sched_setaffinity(0, cpus)
    return len(cpus) or os.cpu_count() or 1


torch.set_num_threads(min(2, share_cores_between_workers()))

TINY = dict(n_layer=2, n_head=2, n_embd=32, n_positions=64, vocab_size=50257)


def has_cuda() -> bool:
    return torch.cuda.is_available()


@pytest.fixture(scope="session")
def hf_dir(tmp_path_factory):
    """A random GPT2LMHeadModel saved as a local Hugging Face directory (config.json + model.safetensors)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(**TINY, eos_token_id=50256, bos_token_id=50256)
    model = GPT2LMHeadModel(cfg).eval()
    # larger weights than the default init: logits with real spread, so argmax is not a coin toss
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0, 0.08)
    path = tmp_path_factory.mktemp("hf") / "tiny-gpt2"
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def hf_model(hf_dir):
    from transformers import GPT2LMHeadModel

    return GPT2LMHeadModel.from_pretrained(hf_dir).eval()


@pytest.fixture(scope="session")
def gpt(hf_dir):
    from gptx.model import GPT

    return GPT.from_pretrained(str(hf_dir))


@pytest.fixture(scope="session")
def export_dir(hf_dir, tmp_path_factory):
    """An fp32 export of the tiny HF model (its source path lets the torch backend reload it)."""
    from gptx.export.convert import export

    out = tmp_path_factory.mktemp("exports") / "tiny"
    export(str(hf_dir), out, progress=False)
    return out


@pytest.fixture(scope="session")
def engine(export_dir):
    import gptx.runtime

    return gptx.runtime.load(export_dir, backend="onnxruntime")


@pytest.fixture(scope="session")
def shakespeare_dir(tmp_path_factory):
    """An fp32 export of the bundled trained model: peaked logits, so greedy ties never flip on ULP noise
    (what batch-invariance tests need). Context 128."""
    from gptx.export.convert import export

    out = tmp_path_factory.mktemp("exports") / "shakespeare"
    export("shakespeare", out, validate=False, progress=False)
    return out


@pytest.fixture(scope="session")
def shakespeare(shakespeare_dir):
    import gptx.runtime

    return gptx.runtime.load(shakespeare_dir, backend="onnxruntime")


@pytest.fixture(scope="session")
def shakespeare_fused(tmp_path_factory):
    """The bundled model with `--optimize`: in-place attention (GroupQueryAttention writes the cache itself)."""
    import gptx.runtime
    from gptx.export.convert import export

    out = tmp_path_factory.mktemp("exports") / "shakespeare-fused"
    export("shakespeare", out, optimize=True, validate=False, progress=False)
    return gptx.runtime.load(out, backend="onnxruntime")


@pytest.fixture(params=["new_tokens_only", "in_place"])
def shakespeare_any(request):
    """The bundled model under each cache contract: the portable graph and the fused in-place one."""
    return request.getfixturevalue("shakespeare" if request.param == "new_tokens_only" else "shakespeare_fused")


EOS_PROBABILITY = 0.25


@pytest.fixture(scope="session")
def eos_dir(tmp_path_factory):
    """A tiny GPT whose next-token distribution is the same at every step, with <|endoftext|> at probability
    EOS_PROBABILITY: sampling meets end-of-text after a few tokens, greedy never does (another token is likelier)."""
    from gptx.export.convert import export
    from gptx.model.gpt import GPT, GPTConfig

    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=64, vocab_size=50257)).eval()
    eos = 50256
    with torch.no_grad():
        wte = model.transformer.wte.weight  # tied to the LM head
        wte.normal_(0, 0.5)
        b = torch.randn(32)
        model.transformer.ln_f.weight.zero_()  # ln_f(x) = b whatever x: the logits are wte @ b at every step
        model.transformer.ln_f.bias.copy_(b)
        others = wte[:eos] @ b
        # one token far likelier than EOS, so greedy never ends but sampling does
        wte[464] = b * (float(torch.logsumexp(others, 0)) + 3.0) / b.dot(b)  # "The"
        others = wte[:eos] @ b
        target = float(torch.logsumexp(others, 0)) + float(np.log(EOS_PROBABILITY / (1 - EOS_PROBABILITY)))
        wte[eos] = b * target / b.dot(b)
    out = tmp_path_factory.mktemp("exports") / "eos"
    export(model, out, validate=False, progress=False)
    return out


def pytest_collection_modifyitems(config, items):
    """`gpu` tests need CUDA (and their own importorskip for TensorRT); skip them with a reason elsewhere."""
    if has_cuda():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (run `pytest -m gpu` on a CUDA machine with gptx[tensorrt])")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


class PoisonedBackend:
    """A real backend whose graph calls misbehave for marked rows: NaN logits where the row's input token is
    `nan_token`, an exception for a call holding `boom_token`. For failure-isolation tests of the scheduler."""

    def __init__(self, backend, nan_token: int = 50000, boom_token: int = 50001):
        self.inner, self.nan_token, self.boom_token = backend, nan_token, boom_token
        self.name, self.capabilities, self.manifest = backend.name, backend.capabilities, backend.manifest
        self.n_layer, self.n_head, self.head_dim = backend.n_layer, backend.n_head, backend.head_dim

    def allocate(self, rows, window):
        return self.inner.allocate(rows, window)

    def run(self, input_ids, attention_mask, position_ids, past):
        if (input_ids[:, -1] == self.boom_token).any():
            raise RuntimeError("the device fell over")
        logits, presents = self.inner.run(input_ids, attention_mask, position_ids, past)
        logits[input_ids[:, -1] == self.nan_token] = np.nan
        return logits, presents


def shakespeare_prompts(n: int, seed: int = 0) -> list[str]:
    """n prompts of different lengths (1 to ~40 tokens) cut from the bundled text."""
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "gptx" / "export" / "data" / "tinyshakespeare.txt").read_text()[:20000]
    rng = np.random.default_rng(seed)
    starts = rng.integers(0, len(text) - 400, n)
    lengths = rng.integers(1, 160, n)
    return [text[s:s + n_chars] for s, n_chars in zip(starts, lengths)]


@pytest.fixture
def one_torch_thread():
    """Tiny models train faster (and deterministically) on one thread on a busy 2-core box; restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
