"""GPTClassifier: last-token pooling, a synthetic task a tiny GPT learns in seconds, input validation."""

import pytest
import torch

from gptx.model.classifier import GPTClassifier, accuracy, batch_and_mask, finetune_classifier, predict
from gptx.model.gpt import GPT, GPTConfig

PAD, TARGET, VOCAB = 0, 7, 64


def tiny_gpt(seed=0, **kw):
    torch.manual_seed(seed)
    cfg = dict(vocab_size=VOCAB, block_size=32, n_layer=2, n_head=2, n_embd=32, dropout=0.0)
    cfg.update(kw)
    return GPT(GPTConfig(**cfg))


def contains_task(n, seed):
    """Random-length sequences of tokens 1..63 (never the pad 0); label 1 iff TARGET occurs. Balanced."""
    g = torch.Generator().manual_seed(seed)
    seqs, labels = [], []
    others = torch.tensor([t for t in range(1, VOCAB) if t != TARGET])
    for i in range(n):
        length = int(torch.randint(4, 13, (1,), generator=g))
        seq = others[torch.randint(len(others), (length,), generator=g)]
        label = i % 2
        if label:
            seq[int(torch.randint(length, (1,), generator=g))] = TARGET
        seqs.append(seq.tolist())
        labels.append(label)
    return seqs, labels


def test_learns_contains_token_task(one_torch_thread):
    train_x, train_y = contains_task(800, seed=1)
    test_x, test_y = contains_task(400, seed=2)
    model = GPTClassifier(tiny_gpt(), num_classes=2, pad_token_id=PAD, dropout=0.0)
    before = accuracy(model, test_x, test_y)
    history = finetune_classifier(model, train_x, train_y, epochs=4, lr=3e-3, batch_size=32, seed=0)
    after = accuracy(model, test_x, test_y)
    assert history[-1]["loss"] < history[0]["loss"]
    assert after >= 0.9, f"held-out accuracy {after:.3f} (before training {before:.3f}), history {history}"


def test_pooling_uses_last_real_token():
    model = GPTClassifier(tiny_gpt(), num_classes=3, pad_token_id=PAD).eval()
    idx = torch.tensor([[5, 9, 11, PAD, PAD], [3, 4, 5, 6, 8]])
    mask = (idx != PAD).long()
    base, _ = model(idx, attention_mask=mask)
    changed = idx.clone()
    changed[0, 3:] = torch.tensor([40, 41])  # garbage where the padding was
    # with an explicit mask: the padded positions do not matter
    logits, _ = model(changed, attention_mask=mask)
    torch.testing.assert_close(logits, base)
    # the logits equal those of the unpadded row alone
    alone, _ = model(torch.tensor([[5, 9, 11]]))
    torch.testing.assert_close(alone[0], base[0])
    # and the last real token does matter
    other = idx.clone()
    other[0, 2] = 12
    moved, _ = model(other, attention_mask=mask)
    assert not torch.allclose(moved[0], base[0])
    torch.testing.assert_close(moved[1], base[1])
    # pad_token_id alone finds the same positions as the mask
    by_pad, _ = model(idx)
    torch.testing.assert_close(by_pad, base)


def test_lists_of_different_lengths_are_padded():
    model = GPTClassifier(tiny_gpt(), num_classes=2).eval()
    logits, loss = model([[1, 2, 3], [4, 5]], labels=[0, 1])
    assert logits.shape == (2, 2) and loss.ndim == 0
    short, _ = model(torch.tensor([[4, 5]]))
    torch.testing.assert_close(logits[1], short[0])
    idx, mask = batch_and_mask([[1, 2, 3], [4]], pad_token_id=9)
    assert idx.tolist() == [[1, 2, 3], [4, 9, 9]] and mask.tolist() == [[1, 1, 1], [1, 0, 0]]
    probs = predict(model, [[1, 2, 3], [4, 5]], return_probs=True)
    torch.testing.assert_close(probs.sum(-1), torch.ones(2))


def test_does_not_run_lm_head():
    gpt = tiny_gpt()
    model = GPTClassifier(gpt, num_classes=2)
    called = []
    gpt.lm_head.register_forward_hook(lambda *a: called.append(1))
    model(torch.tensor([[1, 2, 3]]))
    assert not called


@pytest.mark.parametrize("bad", [0, 1, -3, 2.0, "2", True])
def test_bad_num_classes(bad):
    with pytest.raises(ValueError, match="num_classes"):
        GPTClassifier(tiny_gpt(), num_classes=bad)


def test_bad_labels_and_mask():
    model = GPTClassifier(tiny_gpt(), num_classes=2)
    with pytest.raises(ValueError, match="labels"):
        model(torch.tensor([[1, 2]]), labels=[2])
    with pytest.raises(ValueError, match="attention_mask"):
        model(torch.tensor([[1, 2]]), attention_mask=torch.tensor([[1, 1, 1]]))
    with pytest.raises(ValueError, match="no real tokens"):
        model(torch.tensor([[1, 2]]), attention_mask=torch.tensor([[0, 0]]))
    with pytest.raises(ValueError, match="pad_token_id"):
        GPTClassifier(tiny_gpt(), num_classes=2, pad_token_id=VOCAB)
