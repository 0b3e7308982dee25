import time

import pytest
import torch

from gpt_export import GPT, GPTConfig, Tokenizer
from gpt_export.weights import ModelLoadError, save_checkpoint


def small_config(**kw):
    return GPTConfig(**{**dict(block_size=32, vocab_size=100, n_layer=2, n_head=2, n_embd=16), **kw})


def test_config_defaults_match_the_spec():
    c = GPTConfig()
    assert (c.block_size, c.vocab_size, c.n_layer, c.n_head, c.n_embd, c.dropout, c.bias) == (1024, 50304, 12, 12, 768, 0.0, True)


def test_config_rejects_indivisible_heads():
    with pytest.raises(ValueError, match="divisible"):
        GPTConfig(n_embd=10, n_head=3)


@pytest.mark.parametrize("idx", [[1, 2, 3], [[1, 2, 3], [4, 5, 6]], torch.tensor([1, 2, 3]), torch.tensor([[1, 2, 3]])])
def test_forward_accepts_lists_and_tensors(idx):
    model = GPT(small_config()).eval()
    logits, loss = model(idx)
    batch = 2 if isinstance(idx, list) and isinstance(idx[0], list) else 1
    assert logits.shape == (batch, 3, 100)
    assert loss is None


def test_loss_is_mean_cross_entropy_with_ignore_index():
    model = GPT(small_config()).eval()
    idx = torch.randint(0, 100, (2, 8))
    targets = torch.randint(0, 100, (2, 8))
    logits, loss = model(idx, targets)
    expected = torch.nn.functional.cross_entropy(logits.view(-1, 100), targets.view(-1))
    assert torch.allclose(loss, expected)
    targets[:, :4] = -1
    _, loss_ignored = model(idx, targets)
    expected = torch.nn.functional.cross_entropy(logits[:, 4:].reshape(-1, 100), targets[:, 4:].reshape(-1))
    assert torch.allclose(loss_ignored, expected, atol=1e-6)


@pytest.mark.parametrize("idx,targets,match", [
    (list(range(33)), None, "block_size"),
    ([1, 2, 100], None, "outside the vocabulary"),
    ([1, -2, 3], None, "outside the vocabulary"),
    ([1, 2, 3], [1, 2], "differs"),
    ([], None, "empty"),
    ([[1, 2], [3]], None, "equal-length"),
    ([1.5, 2.0], None, "integer"),
])
def test_bad_inputs_give_clear_value_errors(idx, targets, match):
    model = GPT(small_config())
    with pytest.raises(ValueError, match=match):
        model(idx, targets)


def test_crop_block_size():
    model = GPT(small_config())
    model.crop_block_size(16)
    assert model.config.block_size == 16 and model.transformer.wpe.weight.shape[0] == 16
    with pytest.raises(ValueError, match="block_size"):
        model(list(range(17)))
    with pytest.raises(ValueError):
        model.crop_block_size(64)


def test_num_params_excludes_position_embeddings():
    model = GPT(small_config())
    total = sum(p.numel() for p in model.parameters())
    assert model.get_num_params(non_embedding=False) == total
    assert model.get_num_params() == total - 32 * 16


def test_generate_greedy_is_deterministic_and_respects_length():
    model = GPT(small_config()).eval()
    a = model.generate([[1, 2, 3]], 5, temperature=0)
    b = model.generate(torch.tensor([[1, 2, 3]]), 5, temperature=0)
    assert a.shape == (1, 8) and torch.equal(a, b)
    with pytest.raises(ValueError, match="temperature"):
        model.generate([1], 2, temperature=-1)
    with pytest.raises(ValueError, match="top_p"):
        model.generate([1], 2, top_p=0)


def test_generate_top_k_1_equals_greedy():
    model = GPT(small_config()).eval()
    g = torch.Generator().manual_seed(0)
    assert torch.equal(model.generate([[5, 6]], 6, temperature=0.7, top_k=1, generator=g),
                       model.generate([[5, 6]], 6, temperature=0))


def test_from_pretrained_hf_dir_matches_transformers(gpt, hf_model):
    idx = torch.randint(0, 50257, (3, 20), generator=torch.Generator().manual_seed(1))
    ours, _ = gpt(idx)
    with torch.no_grad():
        theirs = hf_model(idx).logits
    assert (ours - theirs).abs().max().item() < 1e-4


def test_nanogpt_checkpoint_round_trip(gpt, tmp_path):
    path = tmp_path / "ckpt.pt"
    save_checkpoint(gpt, path, iter_num=7)
    again = GPT.from_pretrained(str(path))
    idx = torch.randint(0, 50257, (2, 12))
    assert (again(idx)[0] - gpt(idx)[0]).abs().max().item() < 1e-6
    # torch.compile'd nanoGPT checkpoints prefix their keys
    ckpt = torch.load(path, weights_only=True)
    ckpt["model"] = {"_orig_mod." + k: v for k, v in ckpt["model"].items()}
    torch.save(ckpt, tmp_path / "compiled.pt")
    assert (GPT.from_pretrained(str(tmp_path / "compiled.pt"))(idx)[0] - gpt(idx)[0]).abs().max().item() < 1e-6


def test_override_args_only_dropout(hf_dir):
    model = GPT.from_pretrained(str(hf_dir), override_args={"dropout": 0.1})
    assert model.config.dropout == 0.1
    with pytest.raises(ValueError, match="dropout"):
        GPT.from_pretrained(str(hf_dir), override_args={"n_layer": 3})


def test_hub_name_offline_fails_fast_with_alternatives(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))  # nothing cached
    start = time.monotonic()
    with pytest.raises(ModelLoadError, match="local Hugging Face GPT-2 directory"):
        GPT.from_pretrained("gpt2")
    assert time.monotonic() - start < 10


def test_unknown_name_and_bad_files(tmp_path):
    with pytest.raises(ModelLoadError, match="neither a known model"):
        GPT.from_pretrained("gpt5-ultra")
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ModelLoadError, match="not a readable"):
        GPT.from_pretrained(str(bad))
    (tmp_path / "hf").mkdir()
    with pytest.raises(ModelLoadError, match="config.json"):
        GPT.from_pretrained(str(tmp_path / "hf"))


def test_wrong_architecture_is_rejected(tmp_path, hf_dir):
    import json
    import shutil

    d = tmp_path / "gelu"
    shutil.copytree(hf_dir, d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["activation_function"] = "relu"
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelLoadError, match="activation_function"):
        GPT.from_pretrained(str(d))


def test_spec_usage_example_runs():
    """The README's quick-start, with only the model size made small."""
    config = GPTConfig(block_size=64, n_layer=2, n_head=2, n_embd=32)
    model = GPT(config)
    tokenizer = Tokenizer()
    idx = torch.tensor([tokenizer.encode("Hello, my name is")])
    logits, loss = model(idx)
    assert logits.shape == (1, idx.shape[1], config.vocab_size) and loss is None
    out = model.generate(idx, max_new_tokens=5, temperature=0.8, top_k=40)
    text = tokenizer.decode(out[0].tolist())
    assert text.startswith("Hello, my name is") and len(out[0]) == idx.shape[1] + 5


def test_tanh_gelu_is_used():
    """GPT-2 uses the tanh approximation; exact GELU would drift from HF checkpoints."""
    import inspect

    from gpt_export import model as model_module

    assert 'approximate="tanh"' in inspect.getsource(model_module.MLP.forward)
    mlp = model_module.MLP(small_config())
    x = torch.randn(2, 3, 16)
    expected = mlp.c_proj(torch.nn.functional.gelu(mlp.c_fc(x), approximate="tanh"))
    assert torch.allclose(mlp(x), expected)
