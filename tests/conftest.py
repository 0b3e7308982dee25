"""Shared fixtures: tiny GPT-2 models built locally (the Hub is not needed), and exports of them."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(min(2, os.cpu_count() or 1))

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
    from gpt_export import GPT

    return GPT.from_pretrained(str(hf_dir))


@pytest.fixture(scope="session")
def export_dir(hf_dir, tmp_path_factory):
    """An fp32 export of the tiny HF model (its source path lets the torch backend reload it)."""
    from gpt_export.export import export

    out = tmp_path_factory.mktemp("exports") / "tiny"
    export(str(hf_dir), out, progress=False)
    return out


@pytest.fixture(scope="session")
def engine(export_dir):
    import runtime

    return runtime.load(export_dir, backend="onnxruntime")


def pytest_collection_modifyitems(config, items):
    """`gpu` tests need CUDA (and their own importorskip for TensorRT); skip them with a reason elsewhere."""
    if has_cuda():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (run `pytest -m gpu` on a CUDA machine with gptx[tensorrt])")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
