import pickle
import time

import pytest
import torch

from gptx.model import GPT, GPTConfig
from gptx.runtime import Tokenizer
from gptx.model.weights import ModelLoadError, save_checkpoint
from gptx.runtime.errors import InvalidInput


def small_config(**kw):
    return GPTConfig(**{**dict(block_size=32, vocab_size=100, n_layer=2, n_head=2, n_embd=16), **kw})


def small_model(seed=0, **kw):
    torch.manual_seed(seed)
    return GPT(small_config(**kw)).eval()


def test_config_defaults_are_the_specs():
    """The spec's GPTConfig: GPT-2 124M shapes, vocabulary padded to 50304, no dropout, biases on."""
    c = GPTConfig()
    assert (c.block_size, c.vocab_size, c.n_layer, c.n_head, c.n_embd) == (1024, 50304, 12, 12, 768)
    assert c.dropout == 0.0 and c.bias is True


def test_hidden_size_is_a_read_only_alias_of_n_embd():
    c = small_config(n_embd=48, n_head=4)
    assert c.hidden_size == 48
    with pytest.raises(AttributeError):
        c.hidden_size = 64
    assert "hidden_size" not in c.to_dict()  # checkpoints keep nanoGPT's keys


def test_config_rejects_indivisible_heads():
    with pytest.raises(InvalidInput, match="divisible"):
        GPTConfig(n_embd=10, n_head=3)


@pytest.mark.parametrize("idx", [[1, 2, 3], [[1, 2, 3], [4, 5, 6]], torch.tensor([1, 2, 3]), torch.tensor([[1, 2, 3]])])
def test_forward_accepts_lists_and_tensors(idx):
    model = small_model()
    logits, loss = model(idx)
    batch = 2 if isinstance(idx, list) and isinstance(idx[0], list) else 1
    assert logits.shape == (batch, 3, 100)
    assert loss is None


def test_result_unpacks_indexes_and_has_hf_attributes():
    model = small_model()
    idx = torch.randint(0, 100, (2, 5))
    out = model(idx, idx)
    logits, loss = out
    assert len(out) == 2 and out[0] is logits and out[1] is loss  # train.py does model(x, y)[1]
    assert out.logits is logits and out.loss is loss
    assert out.last_hidden_state.shape == (2, 5, 16) and out.pooler_output.shape == (2, 16)
    torch.testing.assert_close(out.pooler_output, out.last_hidden_state[:, -1])
    again = pickle.loads(pickle.dumps(out))
    assert len(again) == 2 and torch.equal(again.pooler_output, out.pooler_output)
    same = model(input_ids=idx, targets=idx)
    torch.testing.assert_close(same.logits, logits)
    with pytest.raises(InvalidInput, match="once"):
        model(idx, input_ids=idx)


def test_hidden_state_logits_and_loss_match_transformers(gpt, hf_model):
    """Independent reference: transformers' GPT-2 (labels shift inside HF; -100 there is -1 here)."""
    idx = torch.randint(0, 50257, (2, 12), generator=torch.Generator().manual_seed(3))
    labels = idx.clone()
    labels[0, 4:7] = -100
    targets = labels[:, 1:].masked_fill(labels[:, 1:] == -100, -1)
    ours = gpt(idx[:, :-1], targets=targets)
    with torch.no_grad():
        theirs = hf_model(idx, labels=labels, output_hidden_states=True)
    assert abs(ours.loss.item() - theirs.loss.item()) < 1e-5
    assert (ours.logits - theirs.logits[:, :-1]).abs().max().item() < 1e-4
    assert (ours.last_hidden_state - theirs.hidden_states[-1][:, :-1]).abs().max().item() < 1e-4


def test_padding_masks_match_transformers(gpt, hf_model):
    """Right and left padding with a mask give transformers' outputs at every real position."""
    g = torch.Generator().manual_seed(4)
    rows = [torch.randint(0, 50257, (n,), generator=g).tolist() for n in (9, 5)]
    for left in (False, True):
        ids = torch.full((2, 9), 50256)
        mask = torch.zeros(2, 9, dtype=torch.long)
        for r, row in enumerate(rows):
            span = slice(9 - len(row), 9) if left else slice(0, len(row))
            ids[r, span], mask[r, span] = torch.tensor(row), 1
        pos = (mask.cumsum(1) - 1).clamp(min=0)
        ours = gpt(input_ids=ids, attention_mask=mask)
        with torch.no_grad():
            theirs = hf_model(ids, attention_mask=mask, position_ids=pos).logits
        real = mask.bool()
        assert (ours.logits[real] - theirs[real]).abs().max().item() < 1e-4, f"left={left}"
        last = 8 if left else len(rows[1]) - 1
        torch.testing.assert_close(ours.pooler_output[1], ours.last_hidden_state[1, last])


def test_pad_tokens_change_no_real_output():
    model = small_model()
    ids = torch.tensor([[5, 9, 11, 0, 0], [3, 4, 5, 6, 8]])
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    base = model(ids, attention_mask=mask)
    changed = ids.clone()
    changed[0, 3:] = torch.tensor([40, 41])
    moved = model(changed, attention_mask=mask)
    real = mask.bool()
    torch.testing.assert_close(moved.logits[real], base.logits[real], rtol=0, atol=0)
    torch.testing.assert_close(moved.pooler_output, base.pooler_output, rtol=0, atol=0)
    # a real token does move its row's outputs (so the check above can fail)
    other = ids.clone()
    other[0, 1] = 12
    assert not torch.allclose(model(other, attention_mask=mask).logits[0, 2], base.logits[0, 2])


def test_left_padded_rows_equal_each_row_alone():
    model = small_model()
    ids = torch.tensor([[0, 0, 7, 8, 9], [1, 2, 3, 4, 5]])
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    out = model(ids, attention_mask=mask)
    alone = model([7, 8, 9])
    torch.testing.assert_close(out.logits[0, 2:], alone.logits[0])
    torch.testing.assert_close(out.pooler_output[0], alone.pooler_output[0])


def test_ragged_batch_loss_is_the_token_weighted_mean_of_row_losses():
    model = small_model()
    g = torch.Generator().manual_seed(5)
    rows = [torch.randint(0, 100, (n + 1,), generator=g).tolist() for n in (7, 3, 5)]
    inputs, targets = [r[:-1] for r in rows], [r[1:] for r in rows]
    batch = model(inputs, targets=targets)
    per_row = [model(x, targets=y).loss.item() for x, y in zip(inputs, targets)]
    counts = [len(x) for x in inputs]
    expected = sum(loss * n for loss, n in zip(per_row, counts)) / sum(counts)
    assert abs(batch.loss.item() - expected) < 1e-5
    assert batch.logits.shape == (3, 7, 100)
    # each row's logits are those of the row alone
    for r, x in enumerate(inputs):
        torch.testing.assert_close(batch.logits[r, :len(x)], model(x).logits[0])


def test_ragged_errors_name_the_row():
    model = small_model()
    with pytest.raises(InvalidInput, match="targets row 1 has 2 tokens.*3 input tokens"):
        model([[1, 2, 3, 4], [5, 6, 7]], targets=[[2, 3, 4, 5], [6, 7]])
    with pytest.raises(InvalidInput, match="row 1 is empty"):
        model([[1, 2], []])
    with pytest.raises(InvalidInput, match="attention_mask goes with a batch you padded"):
        model([[1, 2], [3]], attention_mask=[[1, 1], [1, 0]])


@pytest.mark.parametrize("kwargs,match", [
    (dict(idx=list(range(33))), "block_size"),
    (dict(idx=[1, 2, 100]), "outside the vocabulary"),
    (dict(idx=[1, -2, 3]), "outside the vocabulary"),
    (dict(idx=[1, 2, 3], targets=[1, 2]), "differs"),
    (dict(idx=torch.zeros(2, 3, dtype=torch.long), targets=torch.zeros(2, 2, dtype=torch.long)), "differs"),
    (dict(idx=[]), "empty"),
    (dict(idx=[1.5, 2.0]), "integer"),
    (dict(idx=[[1, 2], [3, 4]], attention_mask=[[1, 1, 1], [1, 1, 1]]), "attention_mask shape"),
    (dict(idx=[[1, 2], [3, 4]], attention_mask=[[1, 1], [0, 0]]), "row 1 has no real tokens"),
    (dict(), "needs token ids"),
])
def test_bad_inputs_are_invalid_input(kwargs, match):
    model = GPT(small_config())
    with pytest.raises(InvalidInput, match=match):
        model(**kwargs)
    with pytest.raises(ValueError):  # still catchable the usual way
        model(**kwargs)


def test_crop_block_size():
    model = GPT(small_config())
    model.crop_block_size(16)
    assert model.config.block_size == 16 and model.transformer.wpe.weight.shape[0] == 16
    with pytest.raises(InvalidInput, match="block_size"):
        model(list(range(17)))
    with pytest.raises(InvalidInput):
        model.crop_block_size(64)


def test_num_params_match_transformers(gpt, hf_model):
    """Tied embeddings counted once, as transformers counts them; position embeddings left out by default."""
    total = hf_model.num_parameters()
    assert gpt.get_num_params(non_embedding=False) == total
    assert gpt.get_num_params() == total - 64 * 32  # n_positions x n_embd of the fixture


def test_generate_greedy_is_deterministic_and_respects_length():
    model = small_model()
    a = model.generate([[1, 2, 3]], 5, temperature=0)
    b = model.generate(torch.tensor([[1, 2, 3]]), 5, temperature=0)
    assert a.shape == (1, 8) and torch.equal(a, b)
    with pytest.raises(ValueError, match="temperature"):
        model.generate([1], 2, temperature=-1)
    with pytest.raises(ValueError, match="top_p"):
        model.generate([1], 2, top_p=0)


def test_generate_seed_and_top_k_1():
    model = small_model()
    sample = dict(temperature=1.0, top_p=0.95)
    a = model.generate([[5, 6]], 8, seed=3, **sample)
    assert torch.equal(a, model.generate([[5, 6]], 8, seed=3, **sample))
    assert any(not torch.equal(a, model.generate([[5, 6]], 8, seed=s, **sample)) for s in (4, 5, 6))
    assert torch.equal(model.generate([[5, 6]], 6, temperature=0.7, top_k=1, seed=0),
                       model.generate([[5, 6]], 6, temperature=0))


def test_generate_max_length_is_the_total_length():
    model = small_model()
    calls = []
    model.register_forward_hook(lambda *a: calls.append(1))
    assert model.generate([1, 2, 3], max_length=10, temperature=0).shape == (1, 10)
    assert torch.equal(model.generate([1, 2, 3], max_length=10, temperature=0),
                       model.generate([1, 2, 3], max_new_tokens=7, temperature=0))
    calls.clear()
    for kwargs, match in [(dict(max_length=10, max_new_tokens=2), "not both"), (dict(max_length=33), "context of 32"),
                          (dict(max_length=2), "shorter than the prompt"), (dict(), "max_new_tokens"),
                          (dict(max_new_tokens=-1), ">= 0"), (dict(max_length=4.0), "integer")]:
        with pytest.raises(InvalidInput, match=match):
            model.generate([1, 2, 3], **kwargs)
    assert not calls  # rejected before any forward


def test_generate_ragged_prompts_equal_each_alone():
    model = small_model()
    prompts = [[1, 2, 3, 4, 5], [6, 7], [8, 9, 10]]
    out = model.generate(prompts, max_new_tokens=6, temperature=0)
    assert isinstance(out, list) and [len(r) for r in out] == [11, 8, 9]
    for prompt, row in zip(prompts, out):
        assert row == model.generate([prompt], 6, temperature=0)[0].tolist()
    # max_length counts the longest (padded) prompt, as in transformers
    assert [len(r) for r in model.generate(prompts, max_length=7, temperature=0)] == [7, 4, 5]


def test_generate_slides_past_block_size():
    model = small_model()
    out = model.generate(list(range(30)), max_new_tokens=10, temperature=0)
    assert out.shape == (1, 40)


@pytest.mark.parametrize("settings", [
    dict(temperature=0.8, top_k=50, top_p=0.9, seed=7),
    dict(temperature=1.2, top_p=0.8, seed=11),
    dict(temperature=1.0, top_k=20, repetition_penalty=1.3, seed=3),
])
def test_reference_generate_matches_runtime_sampling(gpt, engine, settings):
    """One sampler: the PyTorch reference and the runtime pick the same tokens for the same seed and settings."""
    prompt = [464, 2068, 7586, 21831, 18045]
    runtime_ids = engine.generate_ids(prompt, 24, stop_at_eos=False, **settings)
    reference = gpt.generate([prompt], 24, **settings)[0, len(prompt):].tolist()
    assert runtime_ids == reference
    assert len(set(reference)) > 3  # really sampled, not one token repeated


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


def test_readme_quick_start_runs():
    """The README's Python usage block, with only the model size made small."""
    config = GPTConfig(block_size=64, n_layer=2, n_head=2, n_embd=32)
    model = GPT(config)
    tokenizer = Tokenizer()
    idx = tokenizer.encode("Hello, my name is")
    logits, loss = model(idx, targets=idx[1:] + [tokenizer.eot_token])
    assert logits.shape == (1, len(idx), config.vocab_size) and loss.item() > 0
    out = model.generate(torch.tensor([idx]), max_new_tokens=5, temperature=0.8, top_k=40, top_p=0.95, seed=0)
    text = tokenizer.decode(out[0].tolist())
    assert text.startswith("Hello, my name is") and len(out[0]) == len(idx) + 5


def test_mlp_is_gpt2s_tanh_gelu_mlp():
    """Our MLP against transformers' GPT-2 MLP with the same weights (Conv1D stores them transposed)."""
    from transformers import GPT2Config
    from transformers.models.gpt2.modeling_gpt2 import GPT2MLP

    from gptx.model.gpt import MLP

    torch.manual_seed(0)
    ours = MLP(small_config()).eval()
    theirs = GPT2MLP(64, GPT2Config(n_embd=16, activation_function="gelu_new", resid_pdrop=0.0)).eval()
    with torch.no_grad():
        for a, b in ((theirs.c_fc, ours.c_fc), (theirs.c_proj, ours.c_proj)):
            a.weight.copy_(b.weight.T)
            a.bias.copy_(b.bias)
        x = torch.randn(2, 3, 16) * 3  # wide inputs: where tanh and exact GELU part
        torch.testing.assert_close(ours(x), theirs(x))
        exact = ours.c_proj(torch.nn.functional.gelu(ours.c_fc(x)))
        assert not torch.allclose(ours(x), exact, rtol=0, atol=1e-6)  # the check above can tell them apart
